"""The Slurm tests' harness: job submission and waiting on a live local Slurm, stage cases, result readers.

Nothing about Slurm is mocked: the session starts munged + slurmctld + slurmd as root (tests/slurm/
local_slurm.py, per shared/notes/local-slurm.md), submits the real ``slurm/*.sh`` with ``sbatch``, reads
job states with ``scontrol show job -o``, and stops the daemons it started, by PID, when the session
ends (also after failures). The production ``#SBATCH`` requests (16 nodes x 8 GPUs) are shrunk for this
2-core machine from outside the scripts only: ``sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1``
and ``SBATCH_GPUS_PER_NODE=0`` in the environment; the tiny CPU configuration comes in as Hydra
overrides, exactly as a user would pass them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .local_slurm import LocalSlurm

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
PROGRAMS = Path(__file__).resolve().parent / "programs"
SCRIPTS = ("sft", "rft", "grpo", "metarm", "eval", "convert")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The 16 x 8 GPU request, shrunk to this machine without touching the scripts.
CPU_ALLOCATION = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30")
CPU_ENV = {"SBATCH_GPUS_PER_NODE": "0"}


@dataclass(frozen=True)
class StageCase:
    """How the tests run one stage small: its script, Hydra overrides (``{sft_data}``: a prompt/response
    JSONL; ``{bootstrap}``: a checkpoint that already writes judgments, from the session's ``pipeline``)
    and step counts. A USR1 sent after the first checkpoint must land well before the last step."""

    script: str
    overrides: tuple[str, ...]
    max_steps: int
    save_interval: int

    @property
    def needs_bootstrap(self) -> bool:
        return any("{bootstrap}" in o for o in self.overrides)

    def hydra(self, sft_data: Path, bootstrap: Path | None = None) -> list[str]:
        return [o.format(sft_data=sft_data, bootstrap=bootstrap) for o in self.overrides] + [
            f"trainer.max_steps={self.max_steps}", f"trainer.save_interval={self.save_interval}"]


STAGES = {
    "sft": StageCase("sft.sh", ("cluster=local_cpu", "model=tiny", "parallel=tp2", "data.train={sft_data}",
                                "trainer.seq_length=64"), max_steps=16, save_interval=2),
    # The stages' own CPU presets (conf/experiment/<stage>_tiny.yaml: tiny model, local_cpu, arithmetic data).
    "rft": StageCase("rft.sh", ("+experiment=rft_tiny", "trainer.load={bootstrap}", "data.train=arithmetic:train:32",
                                "data.heldout=null", "rft.eval_before=false", "rft.shard_size=16",
                                "trainer.global_batch_size=8", "trainer.micro_batch_size=4"),
                     max_steps=3, save_interval=1),
    "grpo": StageCase("grpo.sh", ("+experiment=grpo_tiny", "trainer.load={bootstrap}", "data.val=null"), max_steps=3,
                      save_interval=1),
}


def clean_env() -> dict[str, str]:
    """This process's environment without Slurm job/submit variables (CI might itself run in Slurm) and
    without the launcher's GRM_* knobs (a developer's GRM_CONTAINER_IMAGE must not leak into the tests)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "GRM_"))}


class Jobs:
    """Submit scripts to a :class:`LocalSlurm` and follow them; everything lands under ``root``."""

    def __init__(self, cluster: LocalSlurm, root: Path) -> None:
        self.cluster = cluster
        self.root = root

    def submit(self, script: str, args: list[str] | tuple[str, ...] = (), env: dict[str, str | None] | None = None,
               sbatch: tuple[str, ...] = CPU_ALLOCATION, runs_root: Path | None = None) -> int:
        runs_root = runs_root or self.root / "runs"
        runs_root.mkdir(parents=True, exist_ok=True)
        full_env = {**clean_env(), **CPU_ENV, "SLURM_CONF": str(self.cluster.conf), "GRM_RUNS_ROOT": str(runs_root),
                    "OMP_NUM_THREADS": "1", **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}  # env={"NAME": None}: not exported
        full_env["PATH"] = self.cluster.env["PATH"]
        cmd = ["sbatch", "--parsable", f"--output={self.root}/slurm-%x-%j.out", *sbatch, str(SLURM_DIR / script),
               *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=self.root, timeout=60)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}"
        return int(proc.stdout.strip().split(";")[0])

    def info(self, job_id: int) -> dict[str, str]:
        return self.cluster.job(job_id)

    def wait(self, job_id: int, timeout: float, until=lambda info: info.get("JobState") in TERMINAL) -> dict[str, str]:
        """Poll ``scontrol show job -o`` until ``until(info)``; on timeout cancel the job and fail with its logs."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.info(job_id)
            if until(info):
                return info
            time.sleep(0.25)
        self.cluster.run(["scancel", str(job_id)], check=False)
        pytest.fail(f"job {job_id} not done after {timeout} s (state {info.get('JobState')}):\n{self.logs(job_id)}")

    def output(self, job_id: int) -> str:
        """The batch shell's output (slurm-%x-%j.out)."""
        found = list(self.root.glob(f"slurm-*-{job_id}.out"))
        return found[0].read_text(errors="replace") if found else ""

    def logs(self, job_id: int, run_dir: Path | None = None) -> str:
        parts = [f"--- batch output ---\n{self.output(job_id)[-4000:]}"]
        for path in sorted((run_dir or self.root).glob("**/logs/*.log")):
            if str(job_id) in path.name:
                parts.append(f"--- {path} ---\n{path.read_text(errors='replace')[-4000:]}")
        parts.append(f"--- slurmctld ---\n{self.cluster.log_tail('slurmctld', 15)}")
        return "\n".join(parts)


def wait_for_path(jobs: Jobs, job_id: int, path: Path, timeout: float) -> None:
    """Wait until ``path`` exists while the job runs; fail early if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        info = jobs.info(job_id)
        if info.get("JobState") in TERMINAL:
            pytest.fail(f"job {job_id} ended ({info.get('JobState')}) before {path} appeared:\n{jobs.logs(job_id)}")
        time.sleep(0.2)
    jobs.cluster.run(["scancel", str(job_id)], check=False)
    pytest.fail(f"{path} did not appear within {timeout} s:\n{jobs.logs(job_id)}")


def tensorboard_scalars(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` of one scalar over every event file of the run (all attempts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return {}
    return {event.step: event.value for event in acc.Scalars(tag)}


def compare_checkpoints(a: Path, b: Path, out: Path) -> dict:
    """Load both final checkpoints with Megatron's dist_checkpointing (torchrun, 1 process) and compare."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(Path(__file__).resolve().parent / "compare_checkpoints.py"), str(a), str(b), str(out)]
    env = {**clean_env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, f"compare_checkpoints failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def launcher_times(log: str, pattern: str) -> list[float]:
    """Epoch seconds of the launcher-log lines matching ``pattern``."""
    times = []
    for line in log.splitlines():
        m = re.match(r"\[grm (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", line)
        if m and re.search(pattern, line):
            times.append(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")))
    return times

