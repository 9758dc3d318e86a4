"""Shared test helpers: run a script under torchrun (real gloo processes) and read its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# shared/ lies beside the checkout (developers and CI alike); RMB is read there, never copied.
RMB_ROOT = REPO.parent / "shared" / "data" / "rmb"


def torchrun(script: str | Path, nproc: int, args: list[str], timeout: int = 300, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Launch ``script`` with ``nproc`` processes over gloo; fail with the processes' output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--standalone", str(script), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {script} {' '.join(args)} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Pipeline:
    """One finished run of SPCT in miniature (``python -m megatron_grm.demo --scale test``): bootstrap →
    RFT → GRPO → MetaRM → evaluations → HF export, every stage through its real torchrun entry point."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.results = read_json(run_dir / "demo_results.json")

    def checkpoint(self, stage: str) -> Path:
        """The stage's final checkpoint folder (``<run>/<stage>/checkpoints/iter_N``)."""
        folder = self.run_dir / stage / "checkpoints"
        return folder / (folder / "latest").read_text().strip()


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """The README's demo at its test scale, run once per session and shared: its checkpoints are the
    starting models of the RFT, GRPO and Slurm tests (a model that already writes judgments), its
    evaluations and TensorBoard files are what the pipeline tests assert on."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "demo"
    cmd = [sys.executable, "-m", "megatron_grm.demo", "--scale", "test", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                    f"--- stderr ---\n{proc.stderr[-6000:]}")
    return Pipeline(run_dir)
