"""Preemption and requeue on the live local Slurm: checkpoint on a signal, requeue, resume exactly.

The exact-resume test signals a real stage job after its first checkpoint (as Slurm's ``--signal=USR1@T``
time-limit warning would), and compares the final checkpoint tensor by tensor with an uninterrupted run of
the same job. The launcher-logic tests (requeue bound, no retry of real errors, the batch-shell signal
path, container flags) use stand-in programs or real stage failures; Slurm itself is always real.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from .harness import (
    PROGRAMS,
    REPO,
    STAGES,
    Jobs,
    compare_checkpoints,
    launcher_times,
    tensorboard_scalars,
    wait_for_path,
)

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

# Every stage saves/requeues through the same Trainer and launcher; one stage is preempted under Slurm here
# (the CI budget), and the RFT and GRPO stages' own exact-resume tests cover their extra state.
PREEMPTIBLE_STAGES = ["sft"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", PREEMPTIBLE_STAGES)
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(jobs, finished_run, sft_data, tmp_path,
                                                                         stage):
    case = STAGES[stage]
    runs_root = tmp_path / "runs"
    job = jobs.submit(case.script, case.hydra(sft_data), runs_root=runs_root)
    run_dir = runs_root / f"{stage}-{job}"
    # The first periodic checkpoint proves the ranks are in the training loop with their handlers set.
    wait_for_path(jobs, job, run_dir / "checkpoints" / "latest", timeout=300)
    jobs.cluster.run(["scancel", "--signal=USR1", str(job)])
    info = jobs.wait(job, timeout=600)
    logs = jobs.logs(job, run_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["Restarts"] == "1", f"the job should have requeued itself exactly once:\n{logs}"

    first = (run_dir / "logs" / f"{stage}-{job}.0.log").read_text()
    second = (run_dir / "logs" / f"{stage}-{job}.1.log").read_text()
    stopped = re.search(r"stopping on signal after step (\d+)", first)
    assert stopped, f"attempt 0 did not checkpoint on the signal:\n{first[-3000:]}"
    step = int(stopped.group(1))
    assert case.save_interval <= step < case.max_steps, f"the signal landed at step {step}: not mid-run"
    assert re.search(rf"resumed from \S+iter_{step:07d} at step {step}", second), second[-3000:]

    launcher = (run_dir / "logs" / f"launcher-{job}.log").read_text()
    assert "exited 75: requeuing (restart 1" in launcher
    # The requeued attempt ran the same config: one config.yaml, no earlier one kept beside it.
    assert sorted(p.name for p in (run_dir / "hydra").glob("*.yaml")) == ["config.yaml", "overrides.yaml"]
    # The requeued attempt started within seconds, not after Slurm's 120 s requeue delay.
    requeued_at = launcher_times(launcher, r"requeuing")[0]
    restarted_at = launcher_times(launcher, r"job \d+\.1\] stage=")[0]
    assert restarted_at - requeued_at < 60, launcher

    ref_job, ref_info, ref_dir = finished_run(stage)
    assert ref_info["JobState"] == "COMPLETED", jobs.logs(ref_job, ref_dir)
    # Same per-step losses in TensorBoard (both attempts' event files together)...
    assert tensorboard_scalars(run_dir) == tensorboard_scalars(ref_dir)
    # ...and the same final weights and optimizer state, loaded with Megatron's dist_checkpointing.
    result = compare_checkpoints(ref_dir / "checkpoints", run_dir / "checkpoints", tmp_path / "compare.json")
    assert result["model_tensors"] > 0 and result["tensors"] > result["model_tensors"]
    assert not result["only_in_a"] and not result["only_in_b"], result
    assert result["differing"] == [], result["differing"][:20]
    assert result["train_state_a"]["step"] == result["train_state_b"]["step"] == case.max_steps


def test_requeues_are_bounded_by_grm_max_restarts(jobs, tmp_path):
    job = jobs.submit("sft.sh", ["cluster=local_cpu"], runs_root=tmp_path,
                      env={"GRM_PYTHON": str(PROGRAMS / "always_preempted.sh"), "GRM_MAX_RESTARTS": "2"})
    # Two requeues; with Slurm's 120 s requeue delay this would take minutes, not seconds.
    info = jobs.wait(job, timeout=90)
    logs = jobs.logs(job, tmp_path)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", logs
    assert info["Restarts"] == "2", logs
    launcher = (tmp_path / f"sft-{job}" / "logs" / f"launcher-{job}.log").read_text()
    assert launcher.count("requeuing (restart") == 2
    assert "requeued 2 times (GRM_MAX_RESTARTS=2): not requeuing" in launcher


def test_the_requeue_helper_survives_a_batch_shell_that_is_slow_to_exit(jobs, tmp_path):
    # The requeue's kill reaches the batch shell while it is still alive (it lingers in an EXIT trap);
    # the helper that starts the requeued attempt at once must not be among the processes it kills.
    job = jobs.submit(str(PROGRAMS / "requeue_slow_exit.sh"), runs_root=tmp_path, env={"GRM_REPO": str(REPO)},
                      sbatch=("--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--time=30", "--requeue"))
    info = jobs.wait(job, timeout=90)
    launcher = (tmp_path / f"requeue-slow-exit-{job}" / "logs" / f"launcher-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", jobs.logs(job, tmp_path) + launcher
    assert "requeue helper: StartTime=now" in launcher, launcher
    requeued_at = launcher_times(launcher, r"requeuing")[0]
    restarted_at = launcher_times(launcher, r"restarted")[0]
    assert restarted_at - requeued_at < 60, launcher


def test_a_real_error_is_not_requeued(jobs, tmp_path):
    job = jobs.submit("sft.sh", ["cluster=local_cpu", "model=tiny", "parallel=tp2",
                                 f"data.train={tmp_path}/missing.jsonl"], runs_root=tmp_path)
    info = jobs.wait(job, timeout=180)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", jobs.logs(job, tmp_path)
    assert info["Restarts"] == "0"
    out = jobs.output(job)
    assert "step failed (exit 1): not requeuing" in out
    assert "missing.jsonl" in out, "the batch output should end with the failing rank's error"


def _signal_the_batch_shell(jobs, tmp_path, signal: str, program: str = "preempted_once.sh",
                            env: dict[str, str] | None = None) -> tuple[str, Path]:
    """A job of two stand-in ranks that checkpoint on SIGUSR1; once both are up, ``signal`` to the batch shell."""
    job = jobs.submit("sft.sh", ["cluster=local_cpu"], runs_root=tmp_path,
                      env={"GRM_PYTHON": str(PROGRAMS / program), **(env or {})})
    run_dir = tmp_path / f"sft-{job}"
    wait_for_path(jobs, job, run_dir / "ready.0", timeout=60)
    wait_for_path(jobs, job, run_dir / "ready.1", timeout=30)
    jobs.cluster.run(["scancel", "--batch", f"--signal={signal}", str(job)])
    return job, run_dir


def test_a_usr1_to_the_batch_shell_is_forwarded_to_the_ranks(jobs, tmp_path):
    """`sbatch --signal=B:USR1@T` / `scancel --batch --signal=USR1` reach only the batch shell: it forwards."""
    job, run_dir = _signal_the_batch_shell(jobs, tmp_path, "USR1")
    info = jobs.wait(job, timeout=90)
    logs = jobs.logs(job, tmp_path)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    launcher = (run_dir / "logs" / f"launcher-{job}.log").read_text()
    assert "batch shell got SIGUSR1: forwarding it to the ranks" in launcher
    first = (run_dir / "logs" / f"sft-{job}.0.log").read_text()
    assert "0: rank 0: got SIGUSR1" in first and "1: rank 1: got SIGUSR1" in first, first


def test_a_term_to_the_batch_shell_makes_the_ranks_checkpoint_and_the_job_is_not_requeued(jobs, tmp_path):
    """srun answers SIGTERM by SIGKILLing every task: the batch shell forwards SIGUSR1 instead, so the ranks
    checkpoint and exit 75; a terminated batch shell does not requeue."""
    job, run_dir = _signal_the_batch_shell(jobs, tmp_path, "TERM")
    info = jobs.wait(job, timeout=90)
    logs = jobs.logs(job, tmp_path)
    first = (run_dir / "logs" / f"sft-{job}.0.log").read_text()
    # Forwarding SIGTERM instead, the ranks die of srun's SIGKILL (exit 137) and print nothing.
    assert "0: rank 0: got SIGUSR1" in first and "1: rank 1: got SIGUSR1" in first, logs + first
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", logs
    launcher = (run_dir / "logs" / f"launcher-{job}.log").read_text()
    assert "batch shell got SIGTERM: forwarding SIGUSR1 to the ranks" in launcher
    assert "exited 75 while Slurm was terminating the job: not requeuing" in launcher


def test_container_launch_and_default_cluster_in_the_srun_command(jobs, tmp_path):
    job = jobs.submit("grpo.sh", ["model=tiny", "trainer.max_steps=3"], runs_root=tmp_path, env={
        "GRM_DRY_RUN": "1", "GRM_CONTAINER_IMAGE": "/images/megatron-grm.sqsh",
        "GRM_CONTAINER_MOUNTS": "/data:/data", "GRM_MASTER_ADDR": "first-node-ib"})
    info = jobs.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED", jobs.logs(job, tmp_path)
    command = next(line for line in jobs.output(job).splitlines() if "dry run: " in line)
    run_dir = tmp_path / f"grpo-{job}"
    assert "--container-image=/images/megatron-grm.sqsh" in command
    mounts = re.search(r"--container-mounts=(\S+)", command).group(1).split(",")
    assert f"{run_dir}:{run_dir}" in mounts or any(run_dir.is_relative_to(m.split(":")[0]) for m in mounts)
    assert "/data:/data" in mounts and "--no-container-mount-home" in command
    assert " python -m megatron_grm.stages.grpo cluster=a100_16node model=tiny trainer.max_steps=3 " \
           f"trainer.run_dir=\\'{run_dir}\\'" in command  # the dry run prints the words with printf %q
    assert "--cpus-per-task=1" in command and "--wait=" in command
    # The task's settings are given on its command line, so that the image's ENV cannot beat them, and the
    # checkout goes first on PYTHONPATH inside the container, with PYTHONSAFEPATH (no submit dir ahead of it).
    words = command.split()
    task = words[words.index("env"):]
    assert task[1] == f"GRM_REPO={REPO}", command
    for setting in ("OMP_NUM_THREADS=1", "CUDA_DEVICE_MAX_CONNECTIONS=1", "NCCL_IB_TIMEOUT=22", "PYTHONUNBUFFERED=1",
                    f"GRM_RUN_DIR={run_dir}", "MASTER_ADDR=first-node-ib"):
        assert setting in task[:task.index("bash")], (setting, command)
    assert words.index("--container-image=/images/megatron-grm.sqsh") < words.index("env")
    assert "PYTHONPATH=$GRM_REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1" in command, command
    # An experiment preset names its own cluster: the script must not add one that would beat it.
    preset = jobs.submit("grpo.sh", ["+experiment=grpo_tiny"], runs_root=tmp_path, env={"GRM_DRY_RUN": "1"})
    assert jobs.wait(preset, timeout=60)["JobState"] == "COMPLETED"
    command = next(line for line in jobs.output(preset).splitlines() if "dry run: " in line)
    assert "+experiment=grpo_tiny" in command and "cluster=" not in command
    node = jobs.info(preset)["NodeList"]  # one node: its name
    assert f" MASTER_ADDR={node} " in command and node != "first-node-ib", command  # by default the first node


def test_a_megatron_grm_folder_in_the_submit_dir_does_not_shadow_the_checkout(jobs, tmp_path):
    decoy = tmp_path / "megatron_grm"
    decoy.mkdir()
    (decoy / "__init__.py").write_text('raise SystemExit("the decoy megatron_grm of the submit folder")\n')
    submit_dir = Jobs(jobs.cluster, tmp_path)  # submits from tmp_path, the decoy's folder
    job = submit_dir.submit("sft.sh", ["cluster=local_cpu"], env={
        "GRM_PYTHON": str(PROGRAMS / "which_package.sh"), "GRM_TEST_PYTHON": sys.executable})
    info = submit_dir.wait(job, timeout=60)
    log = (tmp_path / "runs" / f"sft-{job}" / "logs" / f"sft-{job}.0.log").read_text()
    assert info["JobState"] == "COMPLETED", submit_dir.logs(job) + log
    for rank in (0, 1):
        assert f"rank {rank}: megatron_grm from {REPO}/megatron_grm/__init__.py" in log, log


def test_cpus_per_task_come_from_the_node_when_the_job_asks_for_whole_nodes(jobs, tmp_path):
    """No --cpus-per-task at submission (as the scripts' headers): the node's CPUs, split among its tasks (the
    local node declares os.cpu_count() CPUs)."""
    job = jobs.submit("grpo.sh", ["model=tiny"], runs_root=tmp_path, env={"GRM_DRY_RUN": "1", "OMP_NUM_THREADS": None},
                      sbatch=("--nodes=1", "--ntasks-per-node=1", "--time=30"))
    info = jobs.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED", jobs.logs(job, tmp_path)
    command = next(line for line in jobs.output(job).splitlines() if "dry run: " in line)
    cpus = os.cpu_count()
    assert f"--cpus-per-task={cpus} " in command and f" OMP_NUM_THREADS={cpus} " in command, command


def test_convert_script_runs_the_tool_as_one_task(jobs, tmp_path):
    job = jobs.submit("convert.sh", ["hf_to_mcore", "--hf", "/models/x", "--out", "/ckpt/x", "--tp", "2"],
                      runs_root=tmp_path, env={"GRM_DRY_RUN": "1"},
                      sbatch=("--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--time=30"))
    info = jobs.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED", jobs.logs(job, tmp_path)
    command = next(line for line in jobs.output(job).splitlines() if "dry run: " in line)
    assert "--ntasks=1" in command and "tools/convert_hf_to_mcore.py --hf /models/x --out /ckpt/x --tp 2" in command
    assert "RANK=" not in command, "the tool starts its own workers: no per-task rank variables"
    assert "PYTHONSAFEPATH=1" in command and f"GRM_REPO={REPO} " in command
    # Each of the tool's TP*PP workers gets its share of the task's CPUs as OMP_NUM_THREADS, not all of them.
    two_cpus = ("--nodes=1", "--ntasks=1", "--cpus-per-task=2", "--time=30")
    for args, threads in ((["hf_to_mcore", "--hf", "/m", "--out", "/c", "--tp", "2"], 1),
                          (["hf_to_mcore", "--hf", "/m", "--out", "/c", "--tp=2", "--pp=2"], 1),
                          (["mcore_to_hf", "--ckpt", "/c", "--out", "/m"], 2)):
        shared = jobs.submit("convert.sh", args, runs_root=tmp_path, sbatch=two_cpus,
                             env={"GRM_DRY_RUN": "1", "OMP_NUM_THREADS": None})
        assert jobs.wait(shared, timeout=60)["JobState"] == "COMPLETED", jobs.logs(shared, tmp_path)
        command = next(line for line in jobs.output(shared).splitlines() if "dry run: " in line)
        assert f" OMP_NUM_THREADS={threads} " in command, (args, command)
    bad = jobs.submit("convert.sh", ["sideways"], runs_root=tmp_path,
                      sbatch=("--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--time=30"))
    info = jobs.wait(bad, timeout=60)
    assert info["JobState"] == "FAILED" and "usage: sbatch slurm/convert.sh" in jobs.output(bad)


def test_a_rank_hanging_in_teardown_after_the_checkpoint_still_gets_the_job_requeued(jobs, tmp_path):
    """Rank 0 exits 75 after marking the run folder (every rank saved); rank 1 hangs until srun's --wait
    kills it, so srun reports a kill, not 75. The marker tells the script the checkpoint is there."""
    job, run_dir = _signal_the_batch_shell(jobs, tmp_path, "USR1", "preempted_then_hangs.sh", {"GRM_SRUN_WAIT": "3"})
    info = jobs.wait(job, timeout=120)
    logs = jobs.logs(job, tmp_path)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    launcher = (run_dir / "logs" / f"launcher-{job}.log").read_text()
    assert "after checkpointing on a signal" in launcher and "treating it as 75" in launcher, launcher
    assert "checkpoint of step 3" in launcher
    first = (run_dir / "logs" / f"sft-{job}.0.log").read_text()
    assert "1: rank 1: got SIGUSR1, hanging in teardown" in first, first
    assert not (run_dir / "stopped_on_signal").exists()  # the requeued attempt cleared it before starting
