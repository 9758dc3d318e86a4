"""Fixtures shared by the rollout tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(script: str):
    """``bench/<script>.py`` loaded as a module (the benches are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    """``bench/rollout.py``."""
    return load_bench("rollout")


@pytest.fixture(scope="session")
def other_cpu_builds(tmp_path_factory) -> Path:
    """One kernel cache per test session for the builds made with another CPU's flags (``-march=haswell``,
    ``x86-64``), shared by the files that check them and by both xdist workers (their temp folders' parent):
    a build made for one test is the same file (same sources, flags and compiler) that the next one loads,
    and ``cpu_decode_kernel``'s build lock has a worker wait for the other's build rather than repeat it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "other-cpu-kernels"
    folder.mkdir(exist_ok=True)
    return folder


def with_march(flags: tuple[str, ...], march: str) -> tuple[str, ...]:
    """The kernels' build flags with ``-march=native`` replaced by ``-march=<march>``, in place (the order is
    part of the library's name, so every test asks for one build per CPU kind)."""
    return tuple(f"-march={march}" if flag == "-march=native" else flag for flag in flags)
