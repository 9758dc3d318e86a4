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


class _VirtualClock:
    """A clock that only calls move: each costs ``per_call`` seconds, and ``stalls`` add a preemption's seconds to
    the calls they name, so the sizing is checked exactly, whatever else runs on the machine."""

    def __init__(self, per_call: float, stalls: dict[int, float] | None = None):
        self.now, self.calls, self.per_call, self.stalls = 0.0, 0, per_call, stalls or {}

    def __call__(self) -> float:
        return self.now

    def call(self) -> None:
        self.calls += 1
        self.now += self.per_call + self.stalls.get(self.calls, 0.0)


@pytest.mark.parametrize("per_call", [2e-3, 5e-5, 1e-6])
def test_a_round_takes_its_seconds_whatever_a_call_costs(gemm_bench, per_call):
    clock = _VirtualClock(per_call)
    calls = gemm_bench.calls_per_round(clock.call, seconds=0.15, clock=clock)
    assert calls * per_call == pytest.approx(0.15, rel=0.01), calls


def test_one_preempted_probe_does_not_shrink_the_round(gemm_bench):
    # 2 ms calls: the probe grows 1, 4, 16 calls; the 16-call probe (calls 6-21) loses 70 ms to another process
    clock = _VirtualClock(2e-3, stalls={10: 0.07})
    calls = gemm_bench.calls_per_round(clock.call, seconds=0.15, clock=clock)
    assert calls == 75


def test_a_call_slower_than_the_round_still_gets_three(gemm_bench):
    clock = _VirtualClock(0.06)
    assert gemm_bench.calls_per_round(clock.call, seconds=0.05, clock=clock) == 3


def test_a_real_round_on_the_wall_clock_stays_near_its_seconds(gemm_bench):
    def busy() -> None:
        end = time.perf_counter() + 2e-3
        while time.perf_counter() < end:
            pass

    calls = gemm_bench.calls_per_round(busy, seconds=0.15)
    # another process on the cores only stretches the probes, so only the ceiling is firm
    assert 3 <= calls <= 125, calls
    began = time.perf_counter()
    gemm_bench._wall_per_call(busy, calls)
    assert time.perf_counter() - began < 1.0
