"""``scripts/gpu_check.sh``, the one script a GPU node runs, on this CPU machine: every part runs and skips
cleanly with its reason, each keeps its log, and a failing part is counted in the exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the real checks")


def run_check(out: Path, python: str) -> subprocess.CompletedProcess:
    """Called from ``out``'s parent with a relative OUT_DIR, as a user would: the logs land there."""
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT), out.name], capture_output=True, text=True, timeout=600, env=env,
                          cwd=out.parent)


def test_without_cuda_every_part_runs_and_says_why_it_skips(tmp_path):
    proc = run_check(tmp_path / "out", sys.executable)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    environment = (out / "environment.log").read_text()
    assert f"torch {torch.__version__}" in environment and "CUDA available False" in environment
    assert "megatron.core: present" in environment and "dynamic inference engine: needs CUDA" in environment
    tests = (out / "gpu_tests.log").read_text()
    # The gpu-marked tests are selected (not silently none) and each skips with the conftest's reason.
    skipped = [line for line in tests.splitlines() if "SKIPPED" in line and "needs CUDA" in line]
    assert len(skipped) >= 4, tests[-3000:]
    assert " passed" not in tests.splitlines()[-1]
    assert "no CUDA device: skipping the GPU MFU benchmark" in (out / "gpu_mfu.log").read_text()
    assert "train_step_bf16: no CUDA device, skipped" in proc.stdout
    assert proc.stdout.strip().endswith(f"0 part(s) failed; logs in {out}")


def test_each_failing_part_is_counted_in_the_exit_status(tmp_path):
    failing = tmp_path / "python"
    failing.write_text("#!/bin/sh\necho 'no interpreter here' >&2\nexit 3\n")
    failing.chmod(0o755)
    proc = run_check(tmp_path / "out", str(failing))
    assert proc.returncode == 3, proc.stdout  # environment, gpu_tests, gpu_mfu; the bf16 step needs CUDA first
    for part in ("environment", "gpu_tests", "gpu_mfu"):
        assert f"== {part}: FAILED (exit 3)" in proc.stdout
        assert "no interpreter here" in (tmp_path / "out" / f"{part}.log").read_text()


def test_part_timeout_stops_a_hanging_part_and_counts_it(tmp_path):
    hanging = tmp_path / "python"  # answers the environment report and the CUDA probe, hangs in every part
    hanging.write_text('#!/bin/sh\ncase "$1" in -) cat >/dev/null; exit 0;; -c) exit 1;; esac\nexec sleep 120\n')
    hanging.chmod(0o755)
    env = {**os.environ, "PYTHON": str(hanging), "PART_TIMEOUT": "2"}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2, proc.stdout
    assert "== environment: ok" in proc.stdout
    for part in ("gpu_tests", "gpu_mfu"):
        assert f"== {part}: FAILED (exit 124)" in proc.stdout


def test_strict_mode_fails_when_a_gpu_test_or_a_benchmark_precision_was_skipped(tmp_path):
    # A node that should run everything (TE, flash-attn, Hopper) must not report success for skipped paths.
    skipping = tmp_path / "python"  # reports, probes no CUDA, skips a GPU test and the FP8 benchmark
    skipping.write_text('#!/bin/sh\ncase "$1" in\n  -) cat >/dev/null; exit 0;;\n  -c) exit 1;;\n'
                        '  -m) echo "tests/x.py::test_te SKIPPED (needs Transformer Engine)"; exit 0;;\n'
                        '  bench/gpu_mfu.py) echo \'{"results": [{"precision": "fp8", "skipped": "no TE"}]}\' > "$3";'
                        ' exit 0;;\nesac\nexit 0\n')
    skipping.chmod(0o755)
    for strict, code in (("", 0), ("1", 1)):
        env = {**os.environ, "PYTHON": str(skipping), "STRICT": strict}
        proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / f"out{strict}")], capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == code, proc.stdout
    assert "== strict: FAILED" in proc.stdout
    log = (tmp_path / "out1" / "strict.log").read_text()
    assert "test_te SKIPPED (needs Transformer Engine)" in log and '"skipped": "no TE"' in log
