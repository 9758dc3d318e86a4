"""Each stage script, submitted to the live local Slurm with the tiny CPU config (2 tasks), runs to the end.

`rft` samples judgments with the bootstrapped model of the session's ``pipeline`` fixture, then trains on
the kept ones; `grpo` starts from the same model (GRPO refuses random weights): rollouts, the update and
checkpoints end to end.
"""

from __future__ import annotations

import pytest
import yaml

from .harness import STAGES, tensorboard_scalars

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]


# rft and grpo start from the session pipeline's bootstrapped model (a model that writes judgments).
@pytest.mark.parametrize("stage", ["sft", "rft", "grpo"])
def test_stage_script_completes_with_checkpoint_and_tensorboard(jobs, finished_run, stage):
    job, info, run_dir = finished_run(stage)
    steps = STAGES[stage].max_steps
    assert info["JobState"] == "COMPLETED", f"job {job} ended {info['JobState']}:\n{jobs.logs(job, run_dir)}"
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    # The run folder is the one the script chose from the job id, and holds everything.
    assert run_dir.name == f"{stage}-{job}"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{steps:07d}"
    final = run_dir / "checkpoints" / latest
    assert (final / "metadata.json").is_file() and (final / "model_config.json").is_file()
    assert list(final.glob("*.distcp")), f"no distributed checkpoint shards in {final}"
    losses = tensorboard_scalars(run_dir)
    assert sorted(losses) == list(range(1, steps + 1)), f"TensorBoard train/loss steps: {sorted(losses)}"
    assert (run_dir / "logs" / f"{stage}-{job}.0.log").is_file()
    launcher = (run_dir / "logs" / f"launcher-{job}.log").read_text()
    assert "step finished (exit 0)" in launcher
    # Rank 0 recorded the composed config and the overrides the script passed (the run folder among them).
    overrides = yaml.safe_load((run_dir / "hydra" / "overrides.yaml").read_text())
    assert f"trainer.max_steps={steps}" in overrides and f"trainer.run_dir='{run_dir}'" in overrides, overrides
    config = yaml.safe_load((run_dir / "hydra" / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == steps and config["trainer"]["run_dir"] == str(run_dir)
    # Two ranks, numbered from Slurm's variables, talking gloo.
    step_log = (run_dir / "logs" / f"{stage}-{job}.0.log").read_text()
    assert "rank 0/2" in step_log and "backend=gloo" in step_log
