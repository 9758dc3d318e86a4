"""Fixtures shared by the rollout tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROLLOUT_BENCH = Path(__file__).resolve().parents[2] / "bench" / "rollout.py"


@pytest.fixture(scope="module")
def bench():
    """``bench/rollout.py`` loaded as a module (the benches are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_rollout", ROLLOUT_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
