"""GPU only: the GRPO stage through its torchrun entry point in bf16 on one GPU (skipped without CUDA).

Every GPU-specific piece of a GRPO step runs: the rollout engine on CUDA (Megatron's dynamic engine with
flash-attn, the static one without), its log-probabilities checked against a training forward
(``data.debug_logprobs``), the frozen reference kept in host memory between uses (``offload_reference``),
the bf16 mixed-precision optimizer on one rank, and the checkpoint it saves. From a random initialisation
every judgment is unparseable (reward -1 everywhere, zero advantages), so this checks plumbing and
agreement, not learning; the CPU pipeline test checks that rewards rise.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from megatron_grm.train.logger import read_scalars
from tests.conftest import REPO, REPO_PYTHONPATH, one_gpu_env

BF16_LOGPROB_TOL = 0.1  # as for the dynamic engine: bf16 logits, decode and training kernels round differently


@pytest.mark.gpu
def test_grpo_runs_on_a_gpu_in_bf16_with_rollout_logprobs_that_match_training(tmp_path):
    import torch

    run = tmp_path / "grpo"
    major, minor = torch.cuda.get_device_capability()
    memory_gb = torch.cuda.get_device_properties(0).total_memory / 1024**3
    overrides = [
        "+experiment=grpo_tiny", "precision=bf16", "cluster=h200_1gpu",
        f"cluster.gpu='{torch.cuda.get_device_name()}'", f"cluster.compute_capability=[{major},{minor}]",
        f"cluster.memory_gb_per_device={memory_gb:.0f}", "trainer.max_steps=2", "trainer.global_batch_size=16",
        "trainer.micro_batch_size=8", "grpo.max_new_tokens=32", "grpo.offload_reference=true",
        "data.debug_logprobs=true", "grpo.random_policy=true", f"trainer.run_dir={run}",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
           "megatron_grm.stages.grpo", *overrides]
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, **one_gpu_env()}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "compute path: CUDA" in log
    assert "rollout backend:" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"

    diffs = read_scalars(run, "train/rollout/rollout_logprob_max_abs_diff")
    assert len(diffs) == 2 and all(0 <= d <= BF16_LOGPROB_TOL for d in diffs), diffs
    # Step 1's policy is the reference: the offloaded reference, brought back, scores the same tokens alike.
    kl = read_scalars(run, "train/kl")
    assert len(kl) == 2 and abs(kl[0]) <= 1e-3, kl
    for tag in ("train/loss", "train/entropy", "train/grad_norm", "train/rollout/response_length",
                "train/rollout/rollout_tokens_per_s", "train/tflops_per_device"):
        values = read_scalars(run, tag)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (tag, values)
    assert all(v > 0 for v in read_scalars(run, "train/rollout/rollout_tokens_per_s"))
