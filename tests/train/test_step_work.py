"""Throughput and MFU count every data-parallel rank's own micro-batches: under length bucketing the ranks'
widths differ, and the logging rank's tokens times the DP size (or attention's cost at one width) misstates
the step's work."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "step_work_dp2.py"


def test_tokens_and_flops_sum_both_ranks_micro_batches_at_their_own_widths(tmp_path):
    out = tmp_path / "work.json"
    torchrun(SCRIPT, 2, [str(tmp_path / "run"), str(out)])
    report = read_json(out)
    for tokens, flops in report["reported"]:  # every rank logs the same totals
        assert tokens == report["expected_tokens"] == 160
        assert flops == pytest.approx(report["expected_flops"], rel=1e-12)
