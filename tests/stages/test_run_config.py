"""A stage run records what it ran: the composed config and the command-line overrides in <run_dir>/hydra/."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from megatron_grm.stages.common import load_config, save_run_config
from tests.conftest import REPO, REPO_PYTHONPATH


def test_a_stage_run_writes_its_config_and_overrides(tmp_path):
    # The real Hydra entry point, one process. It stops at the missing data.train, after prepare_run.
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")
           and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=REPO_PYTHONPATH, OMP_NUM_THREADS="1")
    overrides = ["model=tiny", f"trainer.run_dir={run_dir}", "trainer.seed=7", "optimizer.lr=3e-4"]
    proc = subprocess.run([sys.executable, "-m", "megatron_grm.stages.sft", *overrides], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and "data.train is not set" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    config = yaml.safe_load((run_dir / "hydra" / "config.yaml").read_text())
    assert config["trainer"]["seed"] == 7 and config["optimizer"]["lr"] == 3e-4
    assert config["trainer"]["run_dir"] == str(run_dir)
    assert config["model"]["hidden_size"] == 64 and config["cluster"]["name"] == "local_cpu"  # composed from groups
    assert "hydra" not in config
    assert yaml.safe_load((run_dir / "hydra" / "overrides.yaml").read_text()) == overrides


def test_a_later_attempt_keeps_the_previous_config_only_when_it_differs(tmp_path):
    folder = tmp_path / "hydra"
    first = load_config("sft", ["model=tiny", "trainer.max_steps=5"])
    save_run_config(first, str(tmp_path))
    save_run_config(first, str(tmp_path))  # a requeue: same config, nothing kept twice
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]  # composed without Hydra's app: no overrides
    second = load_config("sft", ["model=tiny", "trainer.max_steps=9"])  # resubmitted to run longer
    save_run_config(second, str(tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == ["config.1.yaml", "config.yaml"]
    assert yaml.safe_load((folder / "config.1.yaml").read_text())["trainer"]["max_steps"] == 5
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_steps"] == 9
    save_run_config(first, str(tmp_path))
    assert yaml.safe_load((folder / "config.2.yaml").read_text())["trainer"]["max_steps"] == 9
