"""The GRPO stage end to end on CPU: mean reward rises over a bounded run, TP=2 over gloo, TensorBoard
metrics, exact checkpoint/resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grm.train.logger import read_scalars
from tests.conftest import REPO, REPO_PYTHONPATH


def _stage(module: str, nproc: int, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           f"megatron_grm.stages.{module}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def base_ckpt(pipeline) -> Path:
    """The session pipeline's RFT model: it writes parseable judgments, right and wrong, so rewards vary."""
    return pipeline.checkpoint("rft")


def test_a_bounded_grpo_run_raises_mean_reward(pipeline):
    """The pipeline's GRPO stage (``+experiment=grpo_tiny`` from its RFT model, 60 steps of 16 examples x G=4)
    on the learnable arithmetic task: the rollouts' mean reward, read back from its TensorBoard, trends up."""
    rewards = read_scalars(pipeline.run_dir / "grpo", "train/rollout/reward_mean")
    steps = list(range(len(rewards)))
    assert len(rewards) >= 12
    third = len(rewards) // 3
    first, last = sum(rewards[:third]) / third, sum(rewards[-third:]) / third
    mean_step, mean_reward = sum(steps) / len(steps), sum(rewards) / len(rewards)
    slope = sum((s - mean_step) * (r - mean_reward) for s, r in zip(steps, rewards)) / sum(
        (s - mean_step) ** 2 for s in steps)
    print(f"GRPO mean reward: first {third} steps {first:+.3f}, last {third} steps {last:+.3f}, "
          f"least-squares slope {slope:+.4f} per step")
    assert last > first and slope > 0


GRPO = ["+experiment=grpo_tiny", "trainer.global_batch_size=16", "trainer.micro_batch_size=8",
        "grpo.max_new_tokens=128", "grpo.temperature=0.7"]


def test_grpo_with_tp2_trains_and_logs_its_metrics(base_ckpt, tmp_path):
    run = tmp_path / "tp2"
    _stage("grpo", 2, [*GRPO, "parallel=tp2", f"trainer.run_dir={run}", f"trainer.load={base_ckpt}",
                       "trainer.max_steps=2"])
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    for tag in ("train/loss", "train/kl", "train/entropy", "train/clip_fraction", "train/rollout/reward_mean",
                "train/rollout/accuracy", "train/rollout/unparseable_fraction", "train/rollout/response_length",
                "train/rollout/rollout_tokens_per_s", "train/tflops_per_device"):
        assert len(read_scalars(run, tag)) == 2, tag
    rewards = read_scalars(run, "train/rollout/reward_mean")
    assert all(-1.0 <= r <= 1.0 for r in rewards)
    assert all(e > 0 for e in read_scalars(run, "train/entropy"))


def test_grpo_resume_continues_exactly(base_ckpt, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*GRPO, f"trainer.load={base_ckpt}", "trainer.max_steps=3", "grpo.updates_per_rollout=1"]
    _stage("grpo", 2, [*common, f"trainer.run_dir={straight}"])
    _stage("grpo", 2, [*common, f"trainer.run_dir={split}", "trainer.exit_after_steps=2"])
    assert (split / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    _stage("grpo", 2, [*common, f"trainer.run_dir={split}"])
    # Same rollouts after the restart (sampled lengths, rewards) and the same updates (loss, KL, entropy).
    for tag in ("train/loss", "train/grad_norm", "train/kl", "train/entropy", "train/rollout/reward_mean",
                "train/rollout/response_length", "train/rollout/unparseable_fraction"):
        got, want = read_scalars(split, tag), read_scalars(straight, tag)
        assert len(want) == 3 and got == want, tag
    # Rewards varied within groups, so the resumed steps really updated the policy (not a zero gradient).
    assert max(read_scalars(straight, "train/grad_norm")) > 0
    assert max(read_scalars(straight, "train/kl")) > 0

