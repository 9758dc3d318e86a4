"""Throughput and MFU count every data-parallel rank's own micro-batches and their real tokens: under length
bucketing the ranks' widths differ, the logging rank's tokens times the DP size (or attention's cost at one
width) misstates the step's work, and padding is no work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "step_work_dp2.py"


def test_tokens_and_flops_sum_both_ranks_micro_batches_at_their_own_widths(tmp_path):
    out = tmp_path / "work.json"
    torchrun(SCRIPT, 2, [str(tmp_path / "run"), str(out)])
    report = read_json(out)
    for tokens, flops, batch_tokens in report["reported"]:  # every rank logs the same totals
        assert tokens == report["expected_tokens"] == 160 - 4 * 4
        assert flops == pytest.approx(report["expected_flops"], rel=1e-12)
        assert batch_tokens == report["expected_batch_tokens"] == 160


def test_document_lengths_follow_the_batch_contract_for_padded_and_packed_rows():
    from megatron_grm.data.packing import collate_padded, pack_documents
    from megatron_grm.train.loop import document_lengths

    docs = [([5] * n, [1] * n) for n in (7, 3, 12)]
    assert document_lengths(collate_padded(docs, seq_length=16)) == [7, 3, 12]
    assert sorted(document_lengths(pack_documents(docs, seq_length=16))) == [3, 7, 12]
    assert document_lengths({"tokens": torch.zeros(2, 8, dtype=torch.long)}) == [8, 8]  # no position ids
