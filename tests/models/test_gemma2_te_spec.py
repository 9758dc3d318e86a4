"""Gemma-2 with the Transformer Engine spec (GPU only; TE has no CPU build, so this never runs here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_PYTHONPATH, read_json
from tests.models.hf_models import save_random_hf

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
                    reason="needs CUDA and Transformer Engine")
def test_te_spec_gemma2_loads_local_checkpoint_and_matches_transformers(tmp_path):
    import os
    import subprocess
    import sys

    hf = save_random_hf("gemma2", tmp_path / "hf")
    # NVIDIA_TF32_OVERRIDE=0: TE would run the fp32 GEMMs in TF32, HF's reference runs them in fp32.
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "NVIDIA_TF32_OVERRIDE": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(SCRIPTS / "gemma2_te_parity.py"), "--hf", str(hf), "--work", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = read_json(tmp_path / "report_te.json")
    assert report["te_spec"] and "PostNormTERowParallelLinear" in report["modules"]
    assert report["max_abs_logit_diff"] <= 1e-3, report  # TE kernels: fp32, but not bit-identical to eager
