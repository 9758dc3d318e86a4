"""The planner: the shipped Gemma-2-27B plans fit an A100-80GB, a too-big layout is refused, the activation
itemisation is Korthikanti et al.'s, and its bytes match what a real CPU training step allocates."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.provider import padded_vocab_size
from megatron_grm.plan import (
    KORTHIKANTI,
    GiB,
    Shape,
    korthikanti_layer_bytes,
    layer_activation_terms,
    make_plan,
)
from megatron_grm.stages.common import load_config
from megatron_grm.train.config import RunConfig
from tests.conftest import REPO, read_json, torchrun

A100_PLANS = ("gemma2_27b_rft_a100", "gemma2_27b_grpo_a100")
# The stage configs default to the paper's run on the reference cluster: they must fit as shipped too.
SHIPPED = tuple(f"plan/{n}" for n in A100_PLANS) + ("rft", "grpo")


def _load_tool():
    spec = importlib.util.spec_from_file_location("plan_tool", REPO / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PLAN_TOOL = _load_tool()


def plan_tool(capsys, *args: str) -> tuple[int, str, str]:
    """tools/plan.py's main in this process (its exit status, stdout, stderr)."""
    code = PLAN_TOOL.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_gemma2_27b_plan_fits_80gb(name):
    plan = make_plan(load_config(name))
    assert plan.run.cluster.gpu == "A100-80GB" and plan.world == 128
    assert plan.run.model.num_layers == 46 and plan.run.model.hidden_size == 4608  # really Gemma-2-27B
    assert plan.fits, plan.refusal()
    assert plan.worst.peak + plan.settings.reserved_gb * GiB <= 80 * GiB
    assert plan.worst.activations > 0 and plan.worst.kv_cache > 0


def test_paper_batch_sizes_and_grpo_reference():
    rft, grpo = (make_plan(load_config(f"plan/{n}")) for n in A100_PLANS)
    assert rft.run.trainer.global_batch_size == 1024 and grpo.run.trainer.global_batch_size == 512
    assert rft.worst.reference == 0
    assert grpo.worst.reference == pytest.approx(grpo.worst.weights)  # a frozen bf16 copy, sharded alike


def test_stage_config_sampling_sections_feed_the_plan():
    """Without a plan: section, conf/grpo.yaml's own group/rollout settings size the KV cache and reference."""
    grpo = load_config("grpo")
    plan = make_plan(grpo)
    assert plan.settings.stage == "grpo" and plan.settings.keeps_reference
    assert plan.settings.rollout_tokens_in_flight == grpo["grpo"]["max_tokens_in_flight"]
    assert plan.settings.max_new_tokens == grpo["grpo"]["max_new_tokens"]
    assert plan.worst.kv_cache > 0 and plan.worst.reference > 0
    halved = make_plan(load_config("grpo", [f"grpo.max_tokens_in_flight={grpo['grpo']['max_tokens_in_flight'] // 2}"]))
    assert halved.worst.kv_cache == pytest.approx(plan.worst.kv_cache / 2)


@pytest.mark.parametrize(("plan_name", "stage"), [("gemma2_27b_grpo_a100", "grpo"), ("gemma2_27b_rft_a100", "rft")])
def test_a_shipped_plan_is_the_stage_config_the_slurm_script_runs(plan_name, stage):
    planned, runs = load_config(f"plan/{plan_name}"), load_config(stage)
    assert {k: v for k, v in planned.items() if k != "plan"} == runs
    assert make_plan(planned).times == make_plan(runs).times


def test_what_a_stage_does_with_a_setting_left_out_is_what_the_plan_assumes():
    import inspect

    from megatron_grm.plan import STAGE_FALLBACKS
    from megatron_grm.rollout.engine import RolloutEngine
    from megatron_grm.rollout.sampling import SamplingConfig
    from megatron_grm.stages.grpo import GRPOSettings
    from megatron_grm.stages.rft import RFTSettings

    engine_default = inspect.signature(RolloutEngine.__init__).parameters["max_tokens_in_flight"].default
    assert STAGE_FALLBACKS == {
        "max_tokens_in_flight": engine_default, "grpo_max_new_tokens": GRPOSettings().max_new_tokens,
        "rft_max_new_tokens": SamplingConfig().max_new_tokens, "rft_num_samples": RFTSettings().num_samples,
        "rft_instruction_ratio": RFTSettings().instruction_ratio,
        "offload_reference": GRPOSettings().offload_reference,
        "recompute_old_logprobs": GRPOSettings().recompute_old_logprobs,
        "updates_per_rollout": GRPOSettings().updates_per_rollout}
    assert GRPOSettings().max_tokens_in_flight == engine_default
    bare = make_plan(load_config("grpo", ["~grpo.max_tokens_in_flight", "~grpo.max_new_tokens"]))
    assert (bare.settings.rollout_tokens_in_flight, bare.settings.max_new_tokens) == (engine_default, 512)
    assert bare.worst.kv_cache > 0 and bare.times["rollout_decode_s"] > 0


def test_rft_samples_n_judgments_for_each_judgment_row_of_a_batch():
    # conf/rft.yaml: batch 1024, 85% instruction data, N = 3: 154 judgment rows, 461 judgments sampled.
    plan = make_plan(load_config("rft"))
    assert plan.settings.rollout_sequences_per_step == 461
    none = make_plan(load_config("rft", ["rft.instruction_ratio=0.0", "rft.num_samples=2"]))
    assert none.settings.rollout_sequences_per_step == 2048


def test_decode_steps_run_the_pipeline_stages_in_turn_and_read_weights_and_kv_cache_from_hbm():
    from megatron_grm.plan import stage_parameters

    # GRPO as shipped: 64 judgments per replica (262144 positions / 4096), each step attending to a mean
    # context of 3072 + 1024/2 positions; a stage's KV cache per token on one GPU: K and V x 23 layers x
    # 2 of the 16 KV heads x 128 x 2 bytes.
    slow_hbm = make_plan(load_config("plan/gemma2_27b_grpo_a100", ["cluster.memory_bandwidth_gb_s=100"]))
    m = slow_hbm.run.model
    kv_per_token = 2 * 23 * 2 * 128 * 2
    read = max(stage_parameters(m, 8, 2)) * 2 + 64 * 3584 * kv_per_token
    tm = slow_hbm.times
    assert tm["decode_rows"] == 64 and tm["decode_bandwidth_bound"] == 1.0
    assert tm["decode_step_ms"] == pytest.approx(2 * read / 100e9 * 1e3)  # two stages, one after the other
    assert tm["rollout_decode_s"] == pytest.approx(1024 * tm["decode_step_ms"] / 1e3)  # one wave of 1024 steps
    fast_hbm = make_plan(load_config("plan/gemma2_27b_grpo_a100", ["cluster.memory_bandwidth_gb_s=1e9"]))
    assert fast_hbm.times["decode_bandwidth_bound"] == 0.0
    flops = 64 * m.flops_per_token(3584) / 3 / 16  # one decode step on one GPU of one stage (TP 8 x PP 2)
    assert fast_hbm.times["decode_step_ms"] == pytest.approx(2 * flops / (312e12 * 0.10) * 1e3)
    # Prefill: only one stage of each replica computes at a time, so half the cluster's GPUs.
    prefill = m.flops_per_token(3072) / 3 * 512 * 3072
    assert tm["rollout_prefill_s"] == pytest.approx(prefill / (64 * 312e12 * 0.40))


def test_a_kv_cache_cap_narrower_than_one_sequence_still_holds_one_sequence():
    narrow = make_plan(load_config("plan/gemma2_27b_grpo_a100", ["grpo.max_tokens_in_flight=2048"]))
    assert narrow.worst.kv_cache == pytest.approx(4096 * 2 * 23 * 2 * 128 * 2)
    assert narrow.times["decode_rows"] == 1


def test_fp8_keeps_te_weight_copies_and_fp8_gemm_inputs():
    common = ["model=llama3_8b", "cluster=h200_1gpu", "parallel=single", "trainer.micro_batch_size=1",
              "trainer.global_batch_size=1", "trainer.seq_length=4096", "trainer.recompute=null"]
    bf16, fp8 = (make_plan(load_config("sft", [*common, f"precision={p}"])).stages[0] for p in ("bf16", "fp8"))
    # Llama-3-8B's GEMMs per layer: QKV 4096 x (4096 + 2 x 1024), proj 4096 x 4096, MLP 3 x 4096 x 14336;
    # 32 layers, row-wise and column-wise FP8 copies (1 byte each).
    gemm = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    assert fp8.fp8_weights == pytest.approx(2 * 32 * gemm) and bf16.fp8_weights == 0
    # The four GEMM inputs each layer keeps (h, h, h, ffn per token) drop from 2 bytes to 1.
    assert bf16.activations - fp8.activations == pytest.approx(32 * 4096 * (3 * 4096 + 14336))
    assert fp8.weights == bf16.weights


def test_the_table_shows_the_fp8_weight_copies_only_for_fp8(capsys):
    common = ["model=llama3_8b", "cluster=h200_1gpu", "parallel=single", "trainer.micro_batch_size=1",
              "trainer.global_batch_size=1", "trainer.seq_length=4096"]
    _, fp8, _ = plan_tool(capsys, "sft", *common, "precision=fp8")
    _, bf16, _ = plan_tool(capsys, "sft", *common, "precision=bf16")
    assert re.search(r"FP8 weight copies \(TE\) +13\.00\n", fp8) and "FP8 weight copies" not in bf16


def test_selective_recompute_rebuilds_one_layers_soft_capped_scores_during_backward():
    from megatron_grm.plan import resolve_kernels

    plan = make_plan(load_config("plan/gemma2_27b_rft_a100"))
    m, x = plan.run.model, Shape(s=4096, b=1, t=8, sp=True)
    _, k = resolve_kernels(plan.run, plan.settings)
    scores = layer_activation_terms(m, x, 2.0, None, k, windowed_fraction=0.5)["scores"]
    kept = sum(layer_activation_terms(m, x, 2.0, "selective", k).values())
    assert plan.stages[0].activations == pytest.approx(2 * 23 * kept + scores)  # 2 micro-batches in flight


def test_the_last_stage_keeps_logits_for_the_judgment_only_under_loss_tokens_only():
    """trainer.loss_tokens_only (default): GRPO's output layer projects max_new_tokens positions per sequence,
    not seq_length; the first stage (no output layer) is unchanged."""
    name = "plan/gemma2_27b_grpo_a100"
    # No recompute: under selective recompute the head's peak overlaps with a layer's rebuilt attention scores.
    only, every = (make_plan(load_config(name, [f"++trainer.loss_tokens_only={flag}", "trainer.recompute=null"]))
                   for flag in ("true", "false"))
    m, t, s = only.run.model, only.run.trainer, only.run.trainer.seq_length
    new = only.settings.max_new_tokens
    assert 0 < new < s
    assert only.stages[0].activations == every.stages[0].activations
    vocab_per_rank = padded_vocab_size(m.vocab_size, 8) / 8
    logits_saved = (4.0 + 2.0) * (s - new) * t.micro_batch_size * vocab_per_rank  # fp32 softmax + bf16 soft-cap
    input_saved = 2.0 * t.micro_batch_size * m.hidden_size * (s / 8 - new)  # SP-split sequence vs the gathered judgment
    assert every.stages[1].activations - only.stages[1].activations == pytest.approx(logits_saved + input_saved)


def test_tool_prints_table_and_exits_zero_when_it_fits(capsys):
    code, out, err = plan_tool(capsys, "gemma2_27b_grpo_a100")
    assert code == 0, err
    for text in ("optimizer states", "activations", "KV cache", "reference model", "step time", "FITS"):
        assert text in out


def test_too_big_layout_is_refused_with_the_reason(capsys):
    code, out, _ = plan_tool(capsys, "gemma2_27b_rft_a100", "parallel=single")  # 27B on every GPU, TP=1 PP=1
    assert code == 1
    assert "REFUSED: does not fit" in out and "80 GiB per GPU" in out
    assert "TP=1 PP=1" in out


def test_invalid_layout_exits_2(capsys):
    code, _, err = plan_tool(capsys, "gemma2_27b_rft_a100", "parallel.tensor_parallel=32")  # 16 KV heads
    assert code == 2
    assert "num_query_groups=16 (KV heads) is not divisible by parallel.tensor_parallel=32" in err


def test_context_parallel_layouts_are_refused_like_the_trainer_refuses_them(capsys):
    code, _, err = plan_tool(capsys, "gemma2_27b_rft_a100", "parallel.context_parallel=2")
    assert code == 2
    assert "parallel.context_parallel=2: the Trainer does not split micro-batches" in err


def test_grpo_step_counts_the_old_policy_forward_only_with_several_updates_and_full_recompute_a_second_forward():
    grpo = make_plan(load_config("plan/gemma2_27b_grpo_a100", ["grpo.updates_per_rollout=2"]))
    tm = grpo.times
    assert tm["old_logprobs_forward_s"] == pytest.approx(tm["reference_forward_s"])  # one policy forward each
    assert tm["step_s"] == pytest.approx(tm["train_s"] + tm["reference_forward_s"] + tm["old_logprobs_forward_s"]
                                         + tm["rollout_prefill_s"] + tm["rollout_decode_s"])
    # One update per rollout (the config's): the old policy is the policy, its log-probabilities the update's own.
    one = make_plan(load_config("plan/gemma2_27b_grpo_a100"))
    assert "old_logprobs_forward_s" not in one.times and one.times["train_s"] == pytest.approx(tm["train_s"])
    off = make_plan(load_config("plan/gemma2_27b_grpo_a100", ["grpo.updates_per_rollout=2",
                                                              "grpo.recompute_old_logprobs=false"]))
    assert "old_logprobs_forward_s" not in off.times
    full = make_plan(load_config("plan/gemma2_27b_grpo_a100", ["trainer.recompute=full"]))
    assert full.times["train_s"] == pytest.approx(tm["train_s"] * 4 / 3)


def test_rollouts_are_planned_without_sequence_parallelism():
    # parallel/inference_layout.py switches SP off for rollouts: the prefill is not split over TP ranks.
    from megatron_grm.plan import resolve_kernels

    plan = make_plan(load_config("plan/gemma2_27b_grpo_a100"))
    m, s = plan.run.model, plan.settings
    _, k = resolve_kernels(plan.run, s)
    wave = s.rollout_tokens_in_flight // (s.max_prompt_tokens + s.max_new_tokens)
    unsplit = sum(layer_activation_terms(m, Shape(s=s.max_prompt_tokens, b=wave, t=8, sp=False), 2.0, None, k).values())
    split = sum(layer_activation_terms(m, Shape(s=s.max_prompt_tokens, b=wave, t=8, sp=True), 2.0, None, k).values())
    assert plan.worst.rollout_working == pytest.approx(unsplit) and unsplit > split


@pytest.mark.parametrize(("family", "cluster", "glu", "norm"), [
    ("llama", "local_cpu", 2.0, None), ("llama", "h200_1gpu", 2.0, None),
    ("gemma2", "local_cpu", 4.0, 8.0), ("gemma2", "a100_16node", 4.0, None)])
def test_the_mlp_and_norms_keep_what_their_kernels_keep(family, cluster, glu, norm):
    # The CPU's C++ SwiGLU and RMSNorm (parallel/elementwise_autograd.py): fc1's output (2 ffn-sized
    # tensors) and the norm's input (the activation dtype: None); on a GPU Megatron's fused SwiGLU (2) and TE's
    # norms (their input); Gemma-2's unfused tanh-GELU GLU: 4 everywhere (measured on a tiny Gemma-2 by a
    # review: one ffn tensor per layer more than the local spec's torch SwiGLU's 3), its torch norms two fp32
    # tensors (8 bytes) on the CPU.
    from megatron_grm.plan import PlanSettings, resolve_kernels

    model = {"llama": "tiny", "gemma2": "gemma2_27b"}[family]
    run = RunConfig.from_dict(load_config("sft", [f"model={model}", f"cluster={cluster}"]))
    kernels = resolve_kernels(run, PlanSettings())[1]
    assert (kernels.glu_tensors, kernels.norm_bytes) == (glu, norm)
    if cluster == "local_cpu" and family == "llama":  # the passes switched off: torch's ops keep more
        off = RunConfig.from_dict(load_config("sft", [f"model={model}", f"cluster={cluster}",
                                                      "trainer.cpu_elementwise_kernels=false"]))
        kernels = resolve_kernels(off, PlanSettings())[1]
        assert (kernels.glu_tensors, kernels.norm_bytes) == (3.0, 8.0)


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
@pytest.mark.parametrize("t,sp", [(1, False), (2, False), (8, False), (2, True), (8, True)])
def test_itemisation_reduces_to_korthikanti_closed_forms(t, sp, recompute):
    """With the paper's GPT layer (MHA, 4h GeLU MLP, LayerNorm, dropout, 16-bit) our terms sum to Table 2."""
    s, b, h, a = 2048, 2, 4096, 32
    gpt = ModelConfig(num_layers=1, hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=a, vocab_size=512)
    ours = sum(layer_activation_terms(gpt, Shape(s=s, b=b, t=t, sp=sp), 2.0, recompute, KORTHIKANTI).values())
    assert ours == pytest.approx(korthikanti_layer_bytes(s, b, h, a, t, sp, recompute), rel=1e-12)


# ------------------------------------------------------------------------------------------ measured on CPU
MEASURED = [("fp32", None, True), ("fp32", "selective", False), ("bf16", "full", True), ("bf16", None, False)]


def small_model_config(precision: str, recompute: str | None, distributed: bool, run_dir: str) -> dict:
    cfg = load_config("sft", ["model=tiny", f"precision={precision}", f"trainer.run_dir={run_dir}"])
    cfg["model"].update(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                        num_query_groups=2, vocab_size=2048)
    cfg["trainer"].update(recompute=recompute, micro_batch_size=2, global_batch_size=8, seq_length=192)
    cfg["optimizer"]["use_distributed_optimizer"] = distributed
    cfg["cluster"].update(nodes=1, devices_per_node=2)  # DP = 2: the distributed optimizer really shards
    return cfg


def test_planner_memory_matches_cpu_training_within_20_percent(tmp_path):
    """2 processes (DP=2) train a small Llama for a step per variant; every component must agree."""
    variants = [small_model_config(p, r, d, str(tmp_path / f"run{i}")) for i, (p, r, d) in enumerate(MEASURED)]
    (tmp_path / "variants.json").write_text(json.dumps(variants))
    torchrun(REPO / "tests" / "plan" / "scripts" / "measure_memory.py", 2,
             ["--variants", str(tmp_path / "variants.json"), "--out", str(tmp_path / "out.json"), "--steps", "1"],
             timeout=240)
    measured = read_json(tmp_path / "out.json")
    assert len(measured) == len(variants)
    for cfg, got in zip(variants, measured):
        planned = make_plan(cfg).stages[0]
        label = f"{cfg['precision']['params_dtype']} recompute={cfg['trainer']['recompute']} " \
                f"distopt={cfg['optimizer']['use_distributed_optimizer']}"
        for part in ("weights", "gradients", "optimizer", "activations"):
            want = getattr(planned, part)
            assert got[part] > 0, f"{label}: measured no {part}"
            assert abs(want - got[part]) <= 0.2 * got[part], f"{label} {part}: planned {want:.0f}, measured {got[part]}"
        total = planned.weights + planned.gradients + planned.optimizer + planned.activations
        assert total == pytest.approx(sum(got.values()), rel=0.2)
    # The measurement itself must see what the planner claims differs between variants.
    assert measured[0]["optimizer"] * 2 == pytest.approx(measured[1]["optimizer"], rel=0.01)  # DP=2 sharding
    assert measured[2]["activations"] < 0.5 * measured[3]["activations"]  # full recompute keeps far less
