"""parallel/embedding_grad.py: the embedding lookup adds its gradient rows straight into DDP's main_grad
instead of a dense vocabulary-sized ``.grad`` that DDP's hook then adds. Megatron's real embedding inside
Megatron's real DDP, 1 and 2 tensor-parallel ranks (gloo), with and without sequence parallelism."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "embedding_grad_check.py"


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def report(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"embedding_grad_tp{request.param}") / "report.json"
    torchrun(SCRIPT, request.param, [str(out)], timeout=180)
    return read_json(out)


def test_the_lookup_adds_its_rows_into_main_grad_exactly_as_megatrons_path(report):
    cases = [report["plain"]] + ([report["sequence_parallel"]] if report["tp"] > 1 else [])
    for case in cases:
        assert case["smallest_main_grad_norm"] > 1.0  # every rank's slice received rows
        assert case["added_by_lookup"] == [False, True]  # Megatron's side went through .grad and the hook
        assert case["grad_left"] == [False, False]  # DDP's hook dropped .grad on both sides
        assert case["out_diff"] == 0.0 and case["out_vs_torch"] == 0.0
        assert case["main_grad_diff"] <= 1e-6
        assert case["main_grad_vs_torch"] <= 1e-6


def test_lookups_that_must_keep_megatrons_path_keep_it_and_still_train(report):
    kept = report["kept"]
    for case in ("tied", "deterministic"):
        assert kept[case]["takes_main_grad_path"] is False
        assert kept[case]["added_by_lookup"] is False
        assert kept[case]["main_grad_rows"] >= 2  # the gradient reached main_grad through DDP's hook
    assert kept["no_grad"]["takes_main_grad_path"] is False and kept["no_grad"]["out_requires_grad"] is False
    assert kept["no_grad"]["out_finite"]
    assert kept["outside_ddp"]["takes_main_grad_path"] is False and kept["outside_ddp"]["grad_rows"] >= 2
