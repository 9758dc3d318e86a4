"""The GRPO stage end to end on CPU: mean reward rises over a bounded run, TP=2 over gloo, TensorBoard
metrics, exact checkpoint/resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_grm.train.logger import read_scalars
from tests.conftest import REPO, REPO_PYTHONPATH, passes_log_line


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


def test_a_bounded_grpo_run_raises_the_validation_reward(pipeline):
    """The pipeline's GRPO stage (``+experiment=grpo_tiny`` from its RFT model, 60 steps of 16 examples x G=4)
    on the learnable arithmetic task: the mean rule reward of 4 sampled judgments per held-out example
    (``data.val``, 256 examples at the test scale) rises from step 0 to the last step by more than twice its
    paired standard error. Every validation draws the same random numbers (per-request streams, same response
    orders), so a policy that did not change would score a gain of exactly 0."""
    run = pipeline.run_dir / "grpo"
    gains, ses = read_scalars(run, "val/reward_gain"), read_scalars(run, "val/reward_gain_se")
    rewards = read_scalars(run, "val/reward_mean")
    assert len(gains) == len(ses) == len(rewards) == 2  # steps 0 and 60 (the demo's test scale)
    assert gains[0] == 0.0 and ses[0] == 0.0
    assert gains[-1] == pytest.approx(rewards[-1] - rewards[0])
    train = read_scalars(run, "train/rollout/reward_mean")
    third = len(train) // 3
    print(f"GRPO validation reward {rewards[0]:+.3f} -> {rewards[-1]:+.3f}, gain "
          f"{gains[-1]:+.3f} ± {ses[-1]:.3f}; rollouts: first {third} steps {sum(train[:third]) / third:+.3f}, "
          f"last {third} steps {sum(train[-third:]) / third:+.3f}")
    assert gains[-1] > 2 * ses[-1] > 0


# The demo's configs keep torch's ops (its bootstrap's lottery, docs/measurements.md); these runs take the
# C++ passes of RMSNorm, SwiGLU and RoPE, every other stage's default, with TP 2 and through a resume.
PASSES = "trainer.cpu_elementwise_kernels=true"
GRPO = ["+experiment=grpo_tiny", "trainer.global_batch_size=16", "trainer.micro_batch_size=8",
        "grpo.max_new_tokens=128", "grpo.temperature=0.7", PASSES]
SMALL_VAL = ["data.val=arithmetic:heldout:8:7", "grpo.val_samples=2"]


@pytest.fixture(scope="module")
def tp2_run(base_ckpt, tmp_path_factory) -> Path:
    """2 GRPO steps with TP 2 (so DP 1), validating 8 held-out examples x 2 judgments at steps 0 and 2. It
    starts from the RFT run's checkpoints folder, which means its ``latest``."""
    run = tmp_path_factory.mktemp("grpo_tp2") / "run"
    _stage("grpo", 2, [*GRPO, *SMALL_VAL, "parallel=tp2", f"trainer.run_dir={run}",
                       f"trainer.load={base_ckpt.parent}", "trainer.max_steps=2"])
    return run


RESUME = [*GRPO, *SMALL_VAL, "grpo.val_interval=2", "trainer.max_steps=3", "grpo.updates_per_rollout=1"]


@pytest.fixture(scope="module")
def straight_run(base_ckpt, tmp_path_factory) -> Path:
    """3 uninterrupted GRPO steps on 2 DP ranks (TP 1), validating at steps 0, 2 and 3."""
    run = tmp_path_factory.mktemp("grpo_straight") / "run"
    proc = _stage("grpo", 2, [*RESUME, f"trainer.load={base_ckpt}", f"trainer.run_dir={run}"])
    (run / "stage_output.txt").write_text(proc.stdout + proc.stderr)
    return run


def test_grpo_with_tp2_trains_and_logs_its_metrics(tp2_run):
    run = tp2_run
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    for tag in ("train/loss", "train/kl", "train/entropy", "train/clip_fraction", "train/rollout/reward_mean",
                "train/rollout/accuracy", "train/rollout/unparseable_fraction", "train/rollout/response_length",
                "train/rollout/rollout_tokens_per_s", "train/tflops_per_device"):
        assert len(read_scalars(run, tag)) == 2, tag
    rewards = read_scalars(run, "train/rollout/reward_mean")
    assert all(-1.0 <= r <= 1.0 for r in rewards)
    assert all(e > 0 for e in read_scalars(run, "train/entropy"))
    # One update per rollout: the old policy is the policy being updated (no clipping, ratio 1).
    assert read_scalars(run, "train/ratio") == pytest.approx([1.0, 1.0], abs=1e-6)
    assert read_scalars(run, "train/clip_fraction") == [0.0, 0.0]
    # Validation before the first step and after the last (grpo_tiny validates every 30 steps).
    for tag in ("val/reward_mean", "val/accuracy", "val/unparseable_fraction", "val/response_length",
                "val/reward_gain", "val/reward_gain_se"):
        assert len(read_scalars(run, tag)) == 2, tag
    assert all(-1.0 <= r <= 1.0 for r in read_scalars(run, "val/reward_mean"))
    assert read_scalars(run, "val/reward_gain")[0] == 0.0


def test_grpo_validation_is_the_same_on_one_and_two_data_parallel_ranks(tp2_run, straight_run):
    """Each rank judges its share of data.val and the per-example rewards are summed over the group: the
    step-0 validation of the same weights reads the same on 1 data-parallel rank (TP 2) and on 2 (TP 1)."""
    for tag in ("val/reward_mean", "val/accuracy", "val/unparseable_fraction", "val/response_length"):
        one, two = read_scalars(tp2_run, tag), read_scalars(straight_run, tag)
        assert len(one) == 2 and len(two) == 3, tag
        assert one[0] == two[0], tag


def test_grpo_resume_continues_exactly(base_ckpt, straight_run, tmp_path):
    straight, split = straight_run, tmp_path / "split"
    common = [*RESUME, f"trainer.load={base_ckpt}"]
    _stage("grpo", 2, [*common, f"trainer.run_dir={split}", "trainer.exit_after_steps=2"])
    assert (split / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    resumed = _stage("grpo", 2, [*common, f"trainer.run_dir={split}"])
    # Both trained on the C++ passes (``PASSES``).
    for output in ((straight / "stage_output.txt").read_text(), resumed.stdout + resumed.stderr):
        assert passes_log_line() in output
    # Same rollouts after the restart (sampled lengths, rewards) and the same updates (loss, KL, entropy).
    for tag in ("train/loss", "train/grad_norm", "train/kl", "train/entropy", "train/rollout/reward_mean",
                "train/rollout/response_length", "train/rollout/unparseable_fraction"):
        got, want = read_scalars(split, tag), read_scalars(straight, tag)
        assert len(want) == 3 and got == want, tag
    # Validation at steps 0, 2 and 3; the resumed process measures its gain from the checkpoint's step 0.
    for tag in ("val/reward_mean", "val/reward_gain", "val/reward_gain_se"):
        got, want = read_scalars(split, tag), read_scalars(straight, tag)
        assert len(want) == 3 and got == want, tag
    # Rewards varied within groups, so the resumed steps really updated the policy (not a zero gradient).
    assert max(read_scalars(straight, "train/grad_norm")) > 0
    assert max(read_scalars(straight, "train/kl")) > 0


def test_a_grpo_step_on_the_passes_matches_torchs_ops(base_ckpt, straight_run, tmp_path):
    """The straight run's first step again with torch's and Megatron's ops: the switch is training's only, so
    the rollouts and validation are the same to the bit, and the step's loss, KL and gradient norm agree
    within fp32 round-off (measured: 8e-8 relative on the gradient norm; a backward pass with a
    wrong term moved it by 8e-4 to 0.16 relative)."""
    run = tmp_path / "torch_ops"
    proc = _stage("grpo", 2, [*(a for a in RESUME if a != PASSES), "trainer.cpu_elementwise_kernels=false",
                              f"trainer.load={base_ckpt}", f"trainer.run_dir={run}", "trainer.max_steps=1"])
    assert "RMSNorm, SwiGLU and RoPE in training: torch's and Megatron's ops" in proc.stdout + proc.stderr
    for tag in ("train/rollout/reward_mean", "train/rollout/response_length", "val/reward_mean"):
        assert read_scalars(run, tag)[0] == read_scalars(straight_run, tag)[0], tag
    for tag in ("train/loss", "train/kl", "train/entropy", "train/grad_norm"):
        torch_ops, passes = read_scalars(run, tag), read_scalars(straight_run, tag)
        assert len(torch_ops) == 1 and torch_ops[0] == pytest.approx(passes[0], rel=1e-5, abs=1e-7), tag
    assert read_scalars(straight_run, "train/grad_norm")[0] > 0
