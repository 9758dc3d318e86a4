"""A non-finite loss skips the update (and aborts after K in a row); SIGTERM checkpoints and exits 75."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_grm.train.signals import EXIT_CODE_PREEMPTED
from tests.conftest import REPO, REPO_PYTHONPATH, python_json, read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "probe_train.py"


def test_a_nonfinite_loss_or_nonfinite_gradients_skip_the_update_then_training_continues(tmp_path):
    """Step 2's loss is NaN; step 4's loss is finite but its gradients are NaN, which Megatron would apply
    when no grad scaler checks them (bf16/fp32): the guard refuses both updates (train/grad_guard.py), the
    weights stay as they were and finite, and training continues."""
    out = tmp_path / "nan.json"
    torchrun(SCRIPT, 1, ["--run-dir", str(tmp_path / "run"), "--steps", "5", "--nan-at", "2", "--nan-grad-at", "4",
                         "--out", str(out)])
    got = read_json(out)
    assert got["error"] is None and got["step"] == 5
    assert got["skipped"] == [False, True, False, True, False]
    assert got["grad_norms"][1] is None  # step 2 never reached the optimizer
    assert got["grad_norms"][3] is None or not math.isfinite(got["grad_norms"][3])
    assert all(math.isfinite(g) for i, g in enumerate(got["grad_norms"]) if i not in (1, 3))
    assert math.isnan(got["losses"][1]) and all(math.isfinite(x) for i, x in enumerate(got["losses"]) if i != 1)
    sums = got["param_sums"]
    assert all(math.isfinite(x) for x in sums)
    assert sums[1] == sums[0] and sums[3] == sums[2]  # the skipped updates did not move the weights
    assert len({sums[0], sums[2], sums[4]}) == 3  # the others did


def test_three_nonfinite_losses_in_a_row_abort_also_across_a_resume(tmp_path):
    """Steps 2 and 3 are skipped and the run stops at step 3 (a requeue); the resumed run's NaN at step 4
    is the third in a row: the counter is part of the checkpoint, so preemptions cannot reset it."""
    run, first, out = tmp_path / "run", tmp_path / "first.json", tmp_path / "abort.json"
    torchrun(SCRIPT, 1, ["--run-dir", str(run), "--steps", "6", "--nan-at", "2,3", "--exit-after", "3",
                         "--out", str(first)])
    assert read_json(first)["skipped"] == [False, True, True]
    torchrun(SCRIPT, 1, ["--run-dir", str(run), "--steps", "6", "--nan-at", "4", "--resume", "--out", str(out)])
    got = read_json(out)
    assert got["error"] is not None and "3 non-finite steps in a row" in got["error"]
    assert got["step"] == 3  # the third NaN (step 4) aborts before counting


def test_a_signal_during_a_save_stops_at_that_checkpoint_and_after_the_last_step_the_run_completes(tmp_path):
    """SIGUSR1 while the step-2 checkpoint is written: the run exits 75 at once with that checkpoint,
    rather than running step 3 (a rollout can outlast Slurm's grace period) and saving again. The same
    signal during the final save does not ask for a requeue: nothing is left to run."""
    run = tmp_path / "run"
    args = ["--tp", "2", "--steps", "4", "--save-interval", "2", "--run-dir", str(run)]
    stopped = torchrun(SCRIPT, 2, [*args, "--signal-in-save-of", "2", "--out", str(tmp_path / "a.json")], check=False)
    assert f"exitcode  : {EXIT_CODE_PREEMPTED}" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert not (run / "checkpoints" / "iter_0000003").exists()
    done = torchrun(SCRIPT, 2, [*args, "--resume", "--signal-in-save-of", "4", "--out", str(tmp_path / "b.json")])
    assert read_json(tmp_path / "b.json")["step"] == 4
    assert "the run is complete" in done.stdout + done.stderr


def test_the_stop_signals_are_handled_from_the_start_of_a_stage():
    """SIGUSR1's default action kills the process: before a stage builds its Trainer (data loading, MetaRM's
    judgment sampling) a Slurm warning would end the job with no checkpoint and no requeue."""
    code = (
        "import os, signal\n"
        "from megatron_grm.stages.common import run_stage\n"
        "from megatron_grm.train.signals import stop_request\n"
        "def stage(cfg):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    print('still running; stop requested:', stop_request().requested, stop_request().signum)\n"
        "run_stage(stage, None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"still running; stop requested: True {int(signal.SIGUSR1)}" in proc.stdout


def test_a_save_leaves_no_helper_process_for_a_signal_to_kill_and_a_signal_during_it_is_a_stop_request():
    """dist_checkpointing's writer would keep a spawned Manager process for its results (~2 s of CPU and
    ~0.3 GB per rank), which Slurm's stop signals, sent to every process of a job step, could kill. Our
    synchronous saves keep the results in this process: after a real save no child process is left, and
    a SIGUSR1 sent while the writer's forked workers run is a stop request (the workers inherit the
    handler), not a lost or fatal signal."""
    code = (
        "import json, os, signal, tempfile, psutil, torch\n"
        "from megatron.core import dist_checkpointing as dc\n"
        "from megatron.core.dist_checkpointing import ShardedTensor\n"
        "from megatron.core.dist_checkpointing.strategies import filesystem_async as fa\n"
        "from megatron_grm.parallel.cpu_compat import apply_cpu_compat\n"
        "from megatron_grm.parallel.distributed import free_port\n"
        "from megatron_grm.train import signals\n"
        "from megatron_grm.train.checkpoint import latest_checkpoint, save_checkpoint\n"
        "torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0,\n"
        "                                     world_size=1)\n"
        "apply_cpu_compat()\n"
        "request = signals.stop_request()\n"
        "write = fa.FileSystemWriterAsync.write_preloaded_data\n"
        "def write_with_a_signal(*a, **k):  # in a forked worker: Slurm signals every process of the step\n"
        "    os.kill(os.getppid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    return write(*a, **k)\n"
        "fa.FileSystemWriterAsync.write_preloaded_data = staticmethod(write_with_a_signal)\n"
        "root = tempfile.mkdtemp()\n"
        "w = torch.arange(6, dtype=torch.float32)\n"
        "folder = save_checkpoint(root, 1, {'w': ShardedTensor.from_rank_offsets('w', w)}, {}, {})\n"
        "back = dc.load({'w': ShardedTensor.from_rank_offsets('w', torch.zeros(6))}, folder)['w']\n"
        "print(json.dumps({'children': [p.name() for p in psutil.Process().children(recursive=True)],\n"
        "                  'requested': request.requested, 'signum': request.signum,\n"
        "                  'latest': os.path.basename(latest_checkpoint(root)), 'equal': torch.equal(back, w)}))\n"
    )
    report = python_json(code, timeout=120)
    assert report == {"children": [], "requested": True, "signum": int(signal.SIGUSR1), "latest": "iter_0000001",
                      "equal": True}


def _sft_jsonl(path: Path, n: int = 32) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i}+{i}?", "response": f"{i}+{i}={2 * i}", "chat": False}) + "\n")
    return path


def test_sigterm_checkpoints_exits_75_and_the_rerun_resumes(tmp_path):
    data = _sft_jsonl(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m",
           "megatron_grm.stages.sft", f"data.train={data}", f"trainer.run_dir={run}", "trainer.max_steps=100000",
           "trainer.seq_length=64", "parallel=tp2"]
    # GRM_RUN_DIR as the Slurm scripts set it: the stage marks the folder once every rank has saved.
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1", "GRM_RUN_DIR": str(run)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            # As Slurm's per-task signal does: every training process gets SIGTERM at once.
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-50:])
    rest = proc.stdout.read()
    code = proc.wait(timeout=120)
    output = "".join(lines) + rest
    # torchrun reports a failed worker with exit 1; the workers' own code is in its report.
    assert code != 0
    assert f"exitcode  : {EXIT_CODE_PREEMPTED}" in output, output[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    saved_step = int(latest.split("_")[1])
    assert saved_step >= 3
    assert (run / "stopped_on_signal").read_text().strip() == f"checkpoint of step {saved_step}"
    resumed = subprocess.run([*cmd[:-4], f"data.train={data}", f"trainer.run_dir={run}",
                              f"trainer.max_steps={saved_step + 2}", "trainer.seq_length=64", "parallel=tp2",
                              "optimizer.override_schedule=true"],  # a shorter run than the 100000 steps planned
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert steps == [f"{saved_step + 1}/{saved_step + 2}", f"{saved_step + 2}/{saved_step + 2}"]


def test_tensorboard_events_hold_the_loss_of_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _sft_jsonl(tmp_path / "train.jsonl")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m",
         "megatron_grm.stages.sft", f"data.train={data}", f"trainer.run_dir={run}", "trainer.max_steps=5",
         "trainer.seq_length=64", "parallel=pp2", "model.num_layers=2", "trainer.peak_tflops=1.0"],
        env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = {int(line.split()[1].split("/")[0]): float(line.split("| loss ")[1].split()[0])
               for line in proc.stdout.splitlines() if line.startswith("step ")}
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    for e in events:
        assert e.value == pytest.approx(printed[e.step], rel=1e-3)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device", "train/mfu"):
        assert len(acc.Scalars(tag)) == 5, tag
    # The LR each step ran with: conf/sft.yaml warms up to 1e-3 over 2 steps from 0 (Megatron's schedule).
    assert [e.value for e in acc.Scalars("train/lr")][:3] == pytest.approx([0.0, 5e-4, 1e-3])
