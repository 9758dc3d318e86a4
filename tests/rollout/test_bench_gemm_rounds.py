"""bench/onednn_linear.py sizes each timed round by the time a call takes, not by its FLOPs: a GEMM of a few
rows on one of the CPU demo's small weights is microseconds of call overhead, and a round sized for
~100 GFLOP/s of it ran for minutes."""

from __future__ import annotations

import time

import pytest

from .conftest import load_bench


@pytest.fixture(scope="module")
def gemm_bench():
    return load_bench("onednn_linear")


def _busy(seconds: float):
    def call() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return call


@pytest.mark.parametrize("per_call", [2e-3, 5e-5])
def test_a_round_takes_about_its_seconds_whatever_a_call_costs(gemm_bench, per_call):
    calls = gemm_bench.calls_per_round(_busy(per_call), seconds=0.15)
    # a busy probe (the other pytest worker) only lowers the count, so the ceiling is firm, the floor loose
    assert 0.05 <= calls * per_call <= 0.25, calls
    began = time.perf_counter()
    gemm_bench._wall_per_call(_busy(per_call), calls)
    assert time.perf_counter() - began < 1.0


def test_a_call_slower_than_the_round_still_gets_three(gemm_bench):
    assert gemm_bench.calls_per_round(_busy(0.06), seconds=0.05) == 3
