"""Fixtures for the Slurm tests: a live local Slurm cluster for the session, inputs, shared reference runs.

Nothing about Slurm is mocked: the session starts munged + slurmctld + slurmd as root (local_slurm.py, per
shared/notes/local-slurm.md) and stops the daemons it started, by PID, when the session ends (also after
failures). The helpers the tests use live in harness.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .harness import STAGES, Jobs
from .local_slurm import LocalSlurm, missing_tools


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> LocalSlurm:
    """A live single-node Slurm cluster (munged, slurmctld, slurmd as root) for the whole session."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"Slurm is not installed (missing {', '.join(missing)}): run "
                    "`apt-get install -y slurm-wlm munge` (CI does this in .ci/run)")
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster runs slurmd/slurmctld as root: run the Slurm tests as root")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start_compute()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def gpu_slurm(slurm, tmp_path_factory) -> LocalSlurm:
    """A second controller on its own ports whose slurm.conf declares 16 nodes x 8 A100 (no slurmd)."""
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm16"), name="a100x16")
    try:
        cluster.start_gpu_controller(slurm.munge_socket)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def jobs(slurm, tmp_path_factory) -> Jobs:
    return Jobs(slurm, tmp_path_factory.mktemp("jobs"))


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    """A tiny prompt/response JSONL for the SFT stage (the other stages bring their own arithmetic data)."""
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    with path.open("w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"What is {i}+{i}?", "response": f"{2 * i}", "chat": False}) + "\n")
    return path


@pytest.fixture(scope="session")
def finished_run(jobs, sft_data, request):
    """``finished_run(stage)`` -> (job id, job info, run dir): the stage run once, uninterrupted, to the end.

    Shared by the "completes" test and the preemption test (its reference), so it runs once per session.
    """
    done: dict[str, tuple[int, dict[str, str], Path]] = {}

    def run(stage: str) -> tuple[int, dict[str, str], Path]:
        if stage not in done:
            runs_root = jobs.root / f"runs-{stage}-reference"
            case = STAGES[stage]
            bootstrap = request.getfixturevalue("pipeline").checkpoint("bootstrap") if case.needs_bootstrap else None
            job = jobs.submit(case.script, case.hydra(sft_data, bootstrap), runs_root=runs_root)
            info = jobs.wait(job, timeout=420)
            done[stage] = (job, info, runs_root / f"{stage}-{job}")
        return done[stage]

    return run
