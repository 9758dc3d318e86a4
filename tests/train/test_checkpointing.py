"""Checkpoints: exact resume after a kill, a crash mid-save never corrupts `latest`, TP=2 -> TP=1 loading."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_grm.train.logger import read_scalars
from tests.conftest import REPO, REPO_PYTHONPATH, python_json, read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "probe_train.py"


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init")
    torchrun(SCRIPT, 1, ["--run-dir", str(root), "--save-init", "--out", str(root / "out.json")])
    return root / "checkpoints" / "iter_0000000"


@pytest.fixture(scope="module")
def straight(init_ckpt, tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "out.json"
    torchrun(SCRIPT, 1, ["--run-dir", str(tmp / "run"), "--init", str(init_ckpt), "--steps", "6", "--out", str(out)])
    return read_json(out), out


def test_kill_during_save_keeps_previous_checkpoint_and_resume_is_exact(init_ckpt, straight, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "killed.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--standalone", str(SCRIPT),
           "--run-dir", str(run), "--init", str(init_ckpt), "--steps", "6", "--save-interval", "3",
           "--hang-in-save-of", "6", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "in_save").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            assert time.time() < deadline, "the run never reached the step-6 save"
            time.sleep(0.2)
        # The step-6 files are written but not yet published: kill everything now (torchrun's worker runs
        # in a session of its own, so its process group as well as torchrun's: with the worker goes anything
        # it started, as a node failure takes it down too, which would otherwise outlive the test).
        worker = int((run / "in_save").read_text().split()[0])
        worker_group = os.getpgid(worker)
        os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            if worker_group != os.getpgid(0):
                os.killpg(worker_group, signal.SIGKILL)
            else:
                os.kill(worker, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000003"
    assert not (ckpts / "iter_0000006").exists()
    assert (ckpts / "iter_0000006.tmp").exists()  # the half-published save is left aside, never named

    # Resume from `latest` (step 3) and finish: losses of steps 4-6 and the final weights match.
    resumed = tmp_path / "resumed.json"
    torchrun(SCRIPT, 1, ["--run-dir", str(run), "--resume", "--steps", "6", "--out", str(resumed)])
    want, want_path = straight
    got = read_json(resumed)
    assert got["step"] == 6
    assert got["fused_adam"] and all(got["fused_adam"])  # the checkpoint's param groups did not switch it off
    assert got["losses"] == want["losses"][3:]  # bit-identical, not approximately equal
    assert got["history"] == want["history"]
    # TensorBoard shows each step once: the killed attempt's steps 4-6 are purged by the resumed one's.
    assert read_scalars(run, "train/loss") == pytest.approx(want["losses"], rel=1e-6)
    a = torch.load(f"{resumed}.rank0.pt")
    b = torch.load(f"{want_path}.rank0.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    assert not (run / "checkpoints" / "iter_0000006.tmp").exists()


@pytest.mark.parametrize(("requested", "dp", "saved", "kind"), [
    (True, 1, None, False), (True, 2, None, True), (False, 2, None, False),  # a fresh run: DP decides
    (True, 1, True, True), (True, 2, False, False), (True, 4, True, True),  # a resume: the checkpoint does
])
def test_a_resumed_run_keeps_its_checkpoints_optimizer_kind(requested, dp, saved, kind):
    from megatron_grm.train.loop import choose_distributed_optimizer

    assert choose_distributed_optimizer(requested, dp, saved) is kind


def test_resume_on_another_number_of_dp_ranks_continues_the_straight_run(init_ckpt, straight, tmp_path):
    # Two DP ranks train with the distributed optimizer, one with the plain one; their states differ, so
    # the run resumed on one rank (a requeue on fewer nodes) keeps the distributed optimizer, resharded to
    # DP=1. (The other direction, plain kept at DP=2, is the decision above; both ran in session 17.)
    saved_on, resumed_on = 2, 1
    run = tmp_path / "run"
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    common = ["--run-dir", str(run), "--init", str(init_ckpt), "--steps", "6"]
    torchrun(SCRIPT, saved_on, [*common, "--exit-after", "3", "--out", str(first)])
    metadata = read_json(run / "checkpoints" / "iter_0000003" / "model_config.json")
    assert metadata["distributed_optimizer"] is (saved_on > 1)
    torchrun(SCRIPT, resumed_on, [*common, "--resume", "--out", str(second)])
    losses = read_json(first)["losses"] + read_json(second)["losses"]
    assert losses == pytest.approx(straight[0]["losses"], abs=1e-5, rel=0)
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_tp2_checkpoint_loads_as_tp1_with_the_same_loss(init_ckpt, tmp_path):
    """The TP=2 run reports its first batch's loss before training and after (with the weights it saves);
    the checkpoint loaded on one rank gives the after-training loss, which is not the initial one."""
    run = tmp_path / "tp2"
    tp2, tp1 = tmp_path / "tp2.json", tmp_path / "eval_tp1.json"
    torchrun(SCRIPT, 2, ["--tp", "2", "--run-dir", str(run), "--init", str(init_ckpt), "--steps", "3",
                         "--eval-around", "--out", str(tp2)])
    saved = run / "checkpoints" / "iter_0000003"
    assert saved.is_dir()
    torchrun(SCRIPT, 1, ["--run-dir", str(tmp_path / "e1"), "--init", str(saved), "--eval-only", "--out", str(tp1)])
    trained = read_json(tp2)
    assert read_json(tp1)["loss"] == pytest.approx(trained["eval_after"], abs=1e-5, rel=0)
    # ... and it is the trained model that was loaded, not the initial one.
    assert abs(read_json(tp1)["loss"] - trained["eval_before"]) > 1e-3


def test_a_checkpoint_without_te_extra_state_loads_and_a_really_missing_entry_is_named(tmp_path):
    """CPU/HF-converted checkpoints have no Transformer Engine ``_extra_state``; a TE model (even its final
    norm, a TENorm once TE is installed) asks for it. Those load as None; anything else missing is an error."""
    script = Path(__file__).parent / "scripts" / "extra_state_load.py"
    torchrun(script, 1, ["--work", str(tmp_path), "--out", str(tmp_path / "report.json")])
    report = read_json(tmp_path / "report.json")
    assert report["checkpoint_has_final_norm_extra_state"] is False
    assert report["te_extra_state_value"] == "None"
    assert report["max_weight_diff"] == 0.0
    assert "decoder.extra.weight" in report["missing_error"] and str(tmp_path / "ckpt") in report["missing_error"]


def test_bf16_on_one_rank_saves_and_resumes_exactly(tmp_path):
    """bf16 with one data-parallel rank takes Megatron's non-distributed mixed-precision optimizer, which
    checkpoints 16-bit parameters only: the local spec's fp32 norm weights made its first save fail. The
    model is all bf16, and a run stopped at step 2 and resumed ends as the straight run does."""
    common = ["--precision", "bf16", "--steps", "4", "--save-interval", "2"]
    straight, split = tmp_path / "straight.json", tmp_path / "split.json"
    torchrun(SCRIPT, 1, [*common, "--run-dir", str(tmp_path / "a"), "--out", str(straight)])
    torchrun(SCRIPT, 1, [*common, "--run-dir", str(tmp_path / "b"), "--exit-after", "2", "--out", str(split)])
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    resumed = tmp_path / "resumed.json"
    torchrun(SCRIPT, 1, [*common, "--run-dir", str(tmp_path / "b"), "--resume", "--out", str(resumed)])
    want, got = read_json(straight), read_json(resumed)
    assert got["step"] == 4 and got["error"] is None
    assert got["losses"] == want["losses"][2:]
    a, b = torch.load(f"{resumed}.rank0.pt"), torch.load(f"{straight}.rank0.pt")
    weights = {k: v for k, v in a.items() if v.is_floating_point()}
    assert weights and {v.dtype for v in weights.values()} == {torch.bfloat16}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_per_rank_state_is_restored_only_into_the_layout_that_wrote_it(tmp_path):
    """Same world size, other TP/PP: rank r is another model shard with other data, so its saved RNG and
    cached rollout must not be loaded (a TP=1 x DP=2 GRPO run resumed at TP=2 would feed two different
    batches into one tensor-parallel group)."""
    from megatron_grm.train.checkpoint import MODEL_CONFIG, load_rank_state

    layout = {"tensor_parallel": 1, "pipeline_parallel": 1}
    torch.save({"producer": "cached rollout of rank 0"}, tmp_path / "rank_state_00000.pt")
    (tmp_path / MODEL_CONFIG).write_text(json.dumps({"layout": layout}))
    assert load_rank_state(str(tmp_path), layout) == {"producer": "cached rollout of rank 0"}
    assert load_rank_state(str(tmp_path), {**layout, "tensor_parallel": 2}) is None
    assert load_rank_state(str(tmp_path), {**layout, "pipeline_parallel": 2}) is None
    (tmp_path / MODEL_CONFIG).write_text(json.dumps({}))  # written before layouts were recorded
    assert load_rank_state(str(tmp_path), layout) is not None
    torch.save({}, tmp_path / "rank_state_00001.pt")  # two ranks wrote it, one reads it
    assert load_rank_state(str(tmp_path), layout) is None


def test_a_checkpoint_saved_for_other_function_only_settings_is_refused(tmp_path):
    """RoPE base, norm epsilon, tying, Gemma-2's caps and window have no tensor of their own: weights load
    under any value, so a Qwen2 checkpoint with rope_theta 1e4 would train (and export) as 1e6 unnoticed."""
    from megatron_grm.models.config import ModelConfig, check_checkpoint_model
    from megatron_grm.train.checkpoint import MODEL_CONFIG

    saved = ModelConfig(family="qwen2", rotary_base=10000.0, norm_epsilon=1e-6, add_qkv_bias=True)
    (tmp_path / MODEL_CONFIG).write_text(json.dumps({"model": saved.to_dict()}))
    check_checkpoint_model(str(tmp_path), ModelConfig.from_dict(saved.to_dict()))  # the same: loads
    check_checkpoint_model(str(tmp_path), ModelConfig(**{**saved.to_dict(), "max_position_embeddings": 64,
                                                         "tokenizer": "elsewhere"}))  # no effect on the weights
    other = ModelConfig(**{**saved.to_dict(), "rotary_base": 1e6, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match=r"model.rotary_base: the checkpoint has 10000.0, this run 1000000.0\n"
                                         r"  model.tie_word_embeddings: the checkpoint has False, this run True"):
        check_checkpoint_model(str(tmp_path), other)
    (tmp_path / MODEL_CONFIG).write_text(json.dumps({"step": 3}))  # a checkpoint that records no model
    check_checkpoint_model(str(tmp_path), other)


def test_a_checkpoint_saved_with_another_split_into_heads_is_refused(tmp_path):
    """The demo's tiny GRM (hidden 128, 4 heads of 32) and the same model with 8 heads of 16 have tensors
    of one shape each, so without this check the weights would load and attend over other heads."""
    from megatron_grm.models.config import ModelConfig, check_checkpoint_model
    from megatron_grm.train.checkpoint import MODEL_CONFIG

    saved = ModelConfig(hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=4)
    (tmp_path / MODEL_CONFIG).write_text(json.dumps({"model": saved.to_dict()}))
    check_checkpoint_model(str(tmp_path), ModelConfig(hidden_size=128, ffn_hidden_size=512,
                                                      num_attention_heads=4))  # MHA spelled without groups
    other = ModelConfig(hidden_size=128, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=8)
    assert other.num_parameters() == saved.num_parameters()
    with pytest.raises(ValueError, match=r"model.num_attention_heads: the checkpoint has 4, this run 8\n"
                                         r"  model.num_query_groups: the checkpoint has 4, this run 8\n"
                                         r"  model.kv_channels: the checkpoint has 32, this run 16"):
        check_checkpoint_model(str(tmp_path), other)
    # GQA: 8 query heads of 16 over 2 KV groups, and 4 of 32 over 1, again one shape per tensor.
    saved = ModelConfig(hidden_size=128, ffn_hidden_size=512, num_attention_heads=8, num_query_groups=2)
    (tmp_path / MODEL_CONFIG).write_text(json.dumps({"model": saved.to_dict()}))
    other = ModelConfig(hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=1)
    assert other.num_parameters() == saved.num_parameters()
    with pytest.raises(ValueError, match=r"model.num_attention_heads: the checkpoint has 8, this run 4\n"
                                         r"  model.num_query_groups: the checkpoint has 2, this run 1\n"):
        check_checkpoint_model(str(tmp_path), other)


def test_a_resave_of_the_same_step_killed_midway_leaves_a_complete_checkpoint(tmp_path):
    """A signal right after a periodic save, or a conversion re-run into its folder, saves a step that
    exists. The old folder used to be deleted before the new one was written: a kill in that window left
    ``latest`` naming nothing. Now the old one is moved aside and removed only after the new one is in place."""
    script = Path(__file__).parent / "scripts" / "resave_crash.py"
    root, out = tmp_path / "checkpoints", tmp_path / "report.json"
    torchrun(script, 1, ["--root", str(root), "--out", str(out)])
    report = read_json(out)
    assert report["crash"] == "killed after the old folder was moved aside"
    assert "iter_0000003" not in report["entries_after_crash"]
    assert report["resolved_after_crash"] == "iter_0000003.replaced"
    assert report["value_after_crash"] == 1.0 and report["metadata_after_crash"] == 1.0
    assert report["entries_after_resave"] == ["iter_0000003", "latest"]
    assert report["value_after_resave"] == 3.0


def test_a_resume_on_another_schedule_is_refused_unless_overridden(tmp_path):
    """Megatron's scheduler keeps the checkpoint's schedule on load: a run lengthened from 4 to 8 steps on
    resume finished its old cosine decay at step 4 and trained the rest at min_lr (0) without a word."""
    import math

    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--save-interval", "2"]
    torchrun(SCRIPT, 1, [*common, "--steps", "4", "--exit-after", "2", "--out", str(tmp_path / "a.json")])
    torchrun(SCRIPT, 1, [*common, "--steps", "8", "--resume", "--out", str(tmp_path / "b.json")])
    error = read_json(tmp_path / "b.json")["resume_error"]
    assert "trainer.max_steps: the checkpoint has 4, this run 8" in error
    assert "optimizer.override_schedule=true" in error and str(run / "checkpoints" / "iter_0000002") in error
    torchrun(SCRIPT, 1, [*common, "--steps", "8", "--resume", "--set", "optimizer.override_schedule=true",
                         "--out", str(tmp_path / "c.json")])
    lengthened = read_json(tmp_path / "c.json")
    assert lengthened["step"] == 8 and len(lengthened["losses"]) == 6
    # Step 2 of an 8-step cosine decay without warmup, not step 2 of the checkpoint's 4-step one.
    from megatron_grm.stages.common import load_config

    optimizer = load_config("sft", [])["optimizer"]  # the probe's config: conf/sft.yaml's schedule
    peak, floor = optimizer["lr"], optimizer["min_lr"]
    want = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 2 / 8))
    assert lengthened["lr_at_start"] == pytest.approx(want)


def test_the_torch_adam_resume_fixes_follow_megatrons_optimizer_not_the_device():
    """A GPU install without TE/apex runs the same torch Adam branch of Megatron's distributed optimizer
    as the CPU, with the same two resume bugs (KeyError 'step', one shared step tensor): the fixes used
    to be applied only without CUDA. They are keyed on Megatron's HAVE_APEX_OR_TE, apart from cpu_compat."""
    code = """
import json
from megatron.core.optimizer import distrib_optimizer
from megatron_grm.parallel import cpu_compat, torch_adam_resume
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D
report = {"torch_adam": not distrib_optimizer.HAVE_APEX_OR_TE}
distrib_optimizer.HAVE_APEX_OR_TE = True  # as with TE or apex installed: their FusedAdam keeps no per-param step
report["with_te"] = [torch_adam_resume.install(), D.load_state_dict.__name__]
distrib_optimizer.HAVE_APEX_OR_TE = False
report["without"] = [torch_adam_resume.install(), D.load_state_dict.__name__,
                     D._set_main_param_and_optimizer_states.__name__, cpu_compat._APPLIED]
print(json.dumps(report))
"""
    report = python_json(code)
    assert report["torch_adam"]  # this machine has neither TE nor apex
    assert report["with_te"] == [False, "load_state_dict"]
    assert report["without"] == [True, "_load_with_private_steps", "_set_states_present", False]
