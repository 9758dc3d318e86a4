"""The rollout engine on the real tiny Megatron model: greedy vs a plain argmax loop, log-probabilities vs
the training forward, seeds, EOS / stop strings / waves, TP=2, refit, and sampling after an optimizer step.

One torchrun launch per layout (TP=1: 1 process, TP=2: 2 processes over gloo) runs every check in
tests/rollout/scripts/rollout_checks.py; the tests below assert on what it recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_grm.parallel import cpu_decode_kernel
from megatron_grm.rollout.alignment import group_cost
from tests.conftest import read_json, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "rollout_checks.py"
LOGPROB_TOL = 1e-5  # fp32 on CPU


def _launch(tmp_path_factory, tp: int) -> dict:
    root = tmp_path_factory.mktemp(f"rollout_tp{tp}")
    torchrun(SCRIPT, tp, ["--tp", str(tp), "--run-dir", str(root / "run"), "--out", str(root / "out.json")])
    return read_json(root / "out.json")


@pytest.fixture(scope="module")
def tp1(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, 2)


@pytest.fixture(params=["tp1", "tp2"])
def run(request) -> dict:
    return request.getfixturevalue(request.param)


def test_greedy_equals_full_recompute_argmax_loop(run):
    assert len(set(run["prompt_lengths"])) > 1  # prompts of different lengths in one batch
    assert run["greedy"] == run["greedy_reference"]
    assert sum(len(t) for t in run["greedy"]) > 3 * run["max_new"]  # real generations, not empty ones


def test_cpu_flash_decode_matches_megatrons_plain_static_path(run):
    """The CPU kernels behind Megatron's flash-decode path (keys rotated once and cached) give the same
    greedy and sampled tokens and log-probabilities as its default path (RoPE re-applied to the cache)."""
    assert run["flash_decode"] is True
    check = run["plain_vs_flash_decode"]
    assert check["tokens"] > 6 * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL


def test_left_aligned_prompts_prefill_once_and_match_megatrons_mixed_length_path(run):
    """A wave of prompts of different lengths is left-padded and prefilled in one forward (MAX_NEW forwards
    in all, where Megatron's own path adds one per position between the shortest and longest prompt),
    with the same greedy and sampled tokens and log-probabilities."""
    check = run["aligned_vs_megatron_mixed_lengths"]
    spread = max(run["prompt_lengths"]) - min(run["prompt_lengths"])
    assert spread > 0
    assert check["forwards_aligned"] == run["max_new"]
    assert check["forwards_megatron"] == run["max_new"] + spread
    assert check["tokens"] == 5 * len(run["prompt_lengths"]) * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL



def test_a_wave_of_different_lengths_is_prefilled_in_groups_of_similar_length(run):
    """Rows of similar length are prefilled together, each group over its own positions (no padding
    positions before its longest prompt), in its own RoPE frame that the decode steps keep: one forward
    per group, then one per new token, with the same greedy and sampled tokens and log-probabilities as
    one prefill over the wave's padded width, and sampled log-probabilities that match training."""
    check = run["length_groups"]
    # By default a group's forward is priced from this rank's layer size (alignment.group_cost).
    assert check["layer_parameters"] > 0
    assert check["default_cost"] == pytest.approx(group_cost(check["layer_parameters"]))
    lengths = check["wave_lengths"]  # the groups' rows index the wave
    assert sorted(run["prompt_lengths"]) == lengths
    width = max(lengths)
    groups = check["groups"]
    assert check["groups_off"] == []
    assert len(groups) >= 2
    assert sorted(r for rows, _ in groups for r in rows) == list(range(len(lengths)))
    for rows, start in groups:
        assert start == width - max(lengths[r] for r in rows)
    # The prefill: one forward per group over its rows and positions; then the decode steps.
    assert check["forwards"][: len(groups)] == [[len(rows), width - start] for rows, start in groups]
    assert len(check["forwards"]) == len(groups) + run["max_new"] - 1
    assert check["forwards_off"][0] == [len(lengths), width]
    assert len(check["forwards_off"]) == run["max_new"]
    # The whole wave's prefill mask is built for the one padded forward only, not for the groups' forwards.
    assert (check["wave_prefill_masks"], check["wave_prefill_masks_off"]) == (0, 1)
    assert sum(shape[1] * shape[0] for shape in check["forwards"][: len(groups)]) < len(lengths) * width
    assert check["tokens"] == 2 * len(lengths) * run["max_new"]  # greedy and sampled, one sample a prompt
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL
    assert check["sampled_logprob_diff_vs_training"] <= LOGPROB_TOL


def test_waves_leave_no_rope_table_behind(run):
    """Megatron's GPTModel caches a RoPE table per inference context length and never drops one; every wave
    has its own length (longest prompt + max new tokens), so without the backend dropping them an RL run
    would hold a table per distinct length on the model's device."""
    check = run["length_groups"]
    assert check["rope_table_holders"] >= 1  # this Megatron keeps such a cache (on every pipeline stage)
    assert check["rope_tables_left"] == 0


def test_a_wave_computes_each_rope_table_once_and_skips_one_rank_tp_mappings(run):
    """Megatron's GPTModel computes the RoPE table of the context length on every forward before looking it
    up in its cache; in a wave each length's table is computed once per rotary module. At one tensor-parallel
    rank the linears' copy / reduce mappings (identities there) are skipped; at two they all run. Both are
    undone after the wave."""
    check = run["length_groups"]
    assert check["wave_forwards"] > 2
    assert check["rope_tables_computed"] == 1  # one rotary module, one length
    assert check["rotary_memo_left"] == 0
    if check["tp"] == 1:
        assert check["tp_mapping_calls"] == 0
    else:  # per forward: each layer's column-parallel copies and row-parallel reduces, and the embedding's
        assert check["tp_mapping_calls"] >= 4 * check["wave_forwards"]


def test_a_waves_decode_steps_read_megatrons_kv_cache_in_place(run):
    """Inside a wave Megatron's static KV caches are allocated head-major ([rows, heads, positions, dim] in
    memory; cpu_decode.contiguous_decode_cache), also the wave cache the length groups are copied into, so
    every decode step reads them in place and no layer makes the head-major copy."""
    check = run["length_groups"]
    assert check["decode_cache_reads"] > 0
    assert check["decode_reads_in_place"] == check["decode_cache_reads"]
    assert check["head_major_copies"] == 0


def test_each_steps_greedy_token_and_log_sum_exp_come_from_one_cpp_pass(run):
    """Where the kernels' library is built, every sampling step of an fp32 CPU wave takes its argmax and
    log-sum-exp from cpu_decode_kernel.argmax_logsumexp (the tokens and log-probabilities these waves give
    are checked against the full-recompute loop and training by the tests above)."""
    check = run["length_groups"]
    assert check["sampling_steps"] > 0
    if check["kernel_built"]:
        assert check["fused_sampling_steps"] == check["sampling_steps"]
    else:
        assert check["fused_sampling_steps"] == 0

def test_the_prefill_attention_runs_in_the_cpp_kernel_with_the_same_results_as_sdpa(run):
    """Every layer's prefill attention of a wave goes through the C++ kernel (the tiny model's 16-channel
    heads, 2 query heads per KV head; at TP = 2 one of each per rank) but the final layer's, which attends
    from the last position alone (test below) and so is no causal prefill; with the same greedy and sampled
    tokens and log-probabilities as torch's SDPA, and sampled log-probabilities that match training.
    Without AVX-512 or AVX2 here every call is SDPA's, and says so."""
    check = run["prefill_kernel"]
    assert check["override_left_installed"] is False
    assert check["stats_off"] is None  # switched off: SDPA throughout, nothing installed
    stats = check["stats"]
    if check["available"]:
        assert stats["kernel"] == check["layers"] - 1 and stats["sdpa"] == 0  # one prefill forward in the last wave
    else:
        assert stats["kernel"] == 0 and stats["sdpa"] == check["layers"] - 1
    assert check["tokens"] == 2 * len(run["prompt_lengths"]) * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL
    assert check["sampled_logprob_diff_vs_training"] <= LOGPROB_TOL


def test_the_prefill_runs_its_final_layer_at_the_last_position_only(run):
    """The final layer's MLP sees one position per row in the prefill (whose width it saw before) and in
    every decode step; greedy and sampled tokens and log-probabilities are the same as with the whole layer,
    in one padded prefill, in length groups and for identical prompts prefilled once; sampled
    log-probabilities match training; nothing stays installed after a wave."""
    check = run["final_layer_at_last_position"]
    width = max(run["prompt_lengths"])
    assert check["mlp_positions_off"][0] == width  # with the whole layer: the prefill's every position
    assert check["mlp_positions"] == [1] * run["max_new"]  # one prefill, then a step per new token
    assert check["mlp_positions_off"][1:] == [1] * (run["max_new"] - 1)
    assert check["hooks_left"] == 0
    assert check["tokens"] == (2 * len(run["prompt_lengths"]) + 6) * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL
    assert check["sampled_logprob_diff_vs_training"] <= LOGPROB_TOL


def test_gemma2s_final_layer_attends_from_the_last_position_alone_with_the_same_results(tp1):
    """Gemma-2's core attention (soft-capped scores, a sliding window shorter than the longest row) takes
    the last query and its row of the mask alike: the same greedy and sampled tokens and log-probabilities."""
    check = tp1["final_layer_at_last_position_gemma2"]
    assert check["unsupported"] is None
    assert max(check["lengths"]) > 24  # the window masks keys of the longest rows
    assert check["tokens"] == 3 * len(tp1["prompt_lengths"]) * tp1["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL


def test_identical_prompts_are_prefilled_once(run):
    """A wave holding copies of a prompt (a group's samples) runs its prefill on one row per distinct
    prompt and gives every copy that prompt's cache: same greedy tokens and log-probabilities as a prefill
    on every row, and sampled rows of one group still draw independently and match training."""
    check = run["shared_prefill"]
    assert check["prefill_shape_every_row"][0] == check["rows"]
    assert check["prefill_shape_shared"][0] == check["distinct"]
    assert check["prefill_shape_shared"][1] == check["prefill_shape_every_row"][1]  # the same window
    assert check["tokens"] == check["rows"] * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL
    assert check["group_distinct_draws"] > 4  # 8 samples of one prompt at temperature 1
    assert check["group_logprob_diff_vs_training"] <= LOGPROB_TOL


def test_decode_reads_a_shared_prompt_once_for_all_its_rows(run):
    """Long shared prompts: each decode step attends over a prompt's cached keys/values once for all the
    rows that hold it (cpu_decode.shared_prompts; forced on here for short prompts). Same greedy tokens
    and log-probabilities as the per-row read; a group's draws stay independent and match training."""
    check = run["shared_prefill"]
    calls = check["shared_decode_calls"]
    # The short prompts stay below the threshold by default; forced, every layer's decode step uses it.
    assert calls["prefill"] == 0 and calls["none"] == 0
    assert calls["decode"] >= (run["max_new"] - 1) * run["layers_per_stage"]
    assert calls["draws"] >= (run["max_new"] - 1) * run["layers_per_stage"]
    assert check["shared_decode_tokens_equal"]
    assert check["shared_decode_logprob_max_abs_diff"] <= LOGPROB_TOL


def test_prompts_sharing_a_head_are_prefilled_and_read_once_where_they_agree(run):
    """An example's prompts in shuffled orders share a head, pairs of them the next block: the prefill
    runs one forward per segment on one row per group (a later segment continuing the cache at its
    positions), decode reads the shared segments once per group, and the tokens and log-probabilities
    equal those of the prefill and decode on every row, across two paddings."""
    check = run["prefix_segments"]
    segments = check["segments"]
    assert len(segments) >= 2 and segments[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(segments, segments[1:]))  # contiguous, from position 0
    assert [groups for _, _, groups in segments] == sorted(groups for _, _, groups in segments)
    assert segments[0][2] == 3  # two heads, the second at two paddings (two prompt lengths)
    assert segments[-1][2] < check["rows"]  # identical orders share to the end
    # Each prefill forward: one row per group, over the segment's positions.
    assert check["forwards"] == [[groups, end - start] for start, end, groups in segments]
    assert check["every_row_first_forward"] == [check["rows"], segments[-1][1]]
    assert check["shared_decode_calls"] >= (run["max_new"] - 1) * run["layers_per_stage"]
    assert check["tokens"] == check["rows"] * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL


def test_gemms_on_weights_reordered_once_per_wave_match_torchs_matmul(run):
    """parallel/onednn_linear.py: the linear layers' GEMMs through oneDNN on weights reordered once per wave
    give the same greedy and sampled tokens and log-probabilities as torch's matmul, at TP 1 and 2; every
    layer's weight is reordered once and every forward of the wave runs its GEMM there. The tiny model's
    weights are under the size threshold, so by default none goes to oneDNN (forced here): where the C++ GEMM
    is on they run it for its calls (every GEMM on AVX2, a decode step's on AVX-512), else torch's matmul."""
    check = run["onednn_gemms"]
    assert check["available"]
    assert check["default_reordered"] == 0
    if run["linear_kernel"]["by_default"]:
        assert check["layers_by_default"] == check["linear_modules"]
        assert check["default_calls"] == check["default_kernel_calls"] > 0
        assert check["default_panels"] >= check["linear_modules"]
    else:
        assert check["layers_by_default"] == check["default_calls"] == 0
    assert check["layers"] == check["linear_modules"] == 4 * run["layers_per_stage"] + 1  # + the output layer
    assert check["reordered"] == check["layers"]
    assert check["forwards"] >= run["max_new"] // 2
    assert check["calls"] == check["layers"] * check["forwards"] and check["fallbacks"] == 0
    assert check["restored"]  # Megatron's own GEMM again after the wave
    assert check["tokens"] > 6 * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL


def test_gemms_in_the_cpp_kernel_match_torchs_matmul(run):
    """parallel/csrc/linear.cpp under Megatron's linear layers in a wave, at TP 1 and 2: every GEMM of the
    wave, prefill and decode steps, runs the kernel on the weight packed once for it, with the same greedy and
    sampled tokens and log-probabilities as torch's matmul. On by default where it was measured faster."""
    check = run["linear_kernel"]
    assert check["built"]  # a C++ compiler is part of the test machine
    assert check["by_default"] == check["enabled_here"]
    assert check["layers"] == run["onednn_gemms"]["layers"]
    assert check["calls"] == check["layers"] * check["forwards"] and check["fallbacks"] == 0
    assert check["kernel_calls"] == check["calls"] and check["reordered"] == 0
    assert check["panels"] == check["layers"]  # once per layer and wave
    assert run["onednn_gemms"]["kernel_calls_off"] == run["onednn_gemms"]["panels_off"] == 0
    assert check["tokens"] > 6 * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL


def test_norms_and_swiglu_in_the_cpp_passes_match_torchs_ops(run):
    """parallel/cpu_elementwise.py in a wave, at TP 1 and 2: every RMSNorm and SwiGLU module of the model
    runs one C++ pass per call (csrc/elementwise.cpp), with the same greedy and sampled tokens and
    log-probabilities as torch's ops, and its own forward again after the wave."""
    check = run["elementwise"]
    assert check["norm_modules"] > 0 and check["norms"] == check["norm_modules"]
    assert check["swiglus"] > 0  # a Llama MLP on the CPU: models/swiglu.py's module
    assert check["kernel_calls"] >= check["norms"] + check["swiglus"] and check["module_calls"] == 0
    assert check["torch_ops_stats"] is None  # switched off: no module swapped
    assert check["restored"]
    assert check["tokens"] > 6 * run["max_new"]
    assert check["tokens_equal"]
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL


def test_waves_run_without_the_cpu_layers_torch_function_mode(run):
    """parallel/cpu_compat.py's process-wide torch-function mode costs ~1.4 µs on each of a decode step's
    torch calls; a wave runs with it off (Megatron's generation loop creates nothing on a "cuda" device),
    and it is on again outside the wave. The tokens made inside equal the reference loop's (greedy test)."""
    check = run["torch_function_in_wave"]
    assert check["forwards_in_wave"] >= 2
    assert check["in_wave"] == [check["cuda"]]  # on a GPU Megatron runs as shipped: no mode to switch off
    assert check["outside"] == [True]


def test_a_prompt_that_pads_like_another_does_not_share_its_prefill(run):
    """[EOS] + Y left-padded beside Y is the same row of tokens as Y padded, but its first position is a
    real token: it must get its own prefill (its log-probabilities then match a training forward)."""
    check = run["padded_lookalike"]
    assert check["tokens"] == 16
    assert check["logprob_max_abs_diff"] <= LOGPROB_TOL


def test_waves_run_with_fp8_off_and_restore_it(run):
    """A model configured for FP8 decodes in bf16 (TE's FP8 GEMMs need rows in multiples of 8; a decode
    step has one per sequence) and is FP8 again for training after the call."""
    check = run["fp8_in_wave"]
    assert check["forwards"] >= 1
    assert check["in_wave"] == ["None"]
    assert check["after"] == "hybrid"


def test_waves_run_without_sequence_parallelism_and_restore_it(tp2):
    """Megatron-Core's static generation raises for a sequence-parallel dense model (the shipped TP8 + SP
    layouts); a rollout turns it off for its forwards, gives the tokens it gives without, and turns it back
    on for training (the config and the layers' own flags)."""
    check = tp2["sp_in_wave"]
    assert check["forwards"] >= 1
    assert check["in_wave"] == [False]
    assert check["after"] == [True, True]
    assert check["tokens_equal"]


def test_tp2_greedy_equals_tp1(tp1, tp2):
    assert tp2["greedy"] == tp1["greedy"]
    # Same weights and math in both layouts (not merely the same argmax).
    for a, b in zip(tp1["greedy_training_logprobs"], tp2["greedy_training_logprobs"]):
        assert a == pytest.approx(b, abs=LOGPROB_TOL, rel=0)


def test_sampled_logprobs_match_training_forward(run):
    assert set(run["logprob_diff"]) == {"temperature_1", "temperature_0.7_top_k_5", "top_p_0.9", "temperature_1.5"}
    for name, diff in run["logprob_diff"].items():
        assert diff <= LOGPROB_TOL, name
    for got, want in zip(run["greedy_logprobs"], run["greedy_training_logprobs"]):
        assert len(got) == len(want)
        assert got == pytest.approx(want, abs=LOGPROB_TOL, rel=0)


def test_debug_mode_reports_the_difference(run):
    assert run["debug_logprob_diff"] is not None
    assert 0.0 <= run["debug_logprob_diff"] <= LOGPROB_TOL


def test_padding_rows_of_the_vocabulary_are_never_sampled(run):
    assert run["tokenizer_vocab"] < run["model_vocab"]
    for name, top in run["max_token_id"].items():
        assert top < run["tokenizer_vocab"], name


def test_n_samples_per_prompt_grouped_by_prompt(run):
    n_prompts = len(run["prompt_lengths"])
    for order in run["n_group"].values():
        assert order == [[i, j] for i in range(n_prompts) for j in range(3)]


def test_same_seed_same_samples_different_seed_different_samples(run):
    assert run["same_seed_equal"] is True
    assert run["different_seed_equal"] is False
    assert run["global_rng_untouched"] is True


def test_tp2_ranks_draw_the_same_tokens_as_tp1(tp1, tp2):
    assert tp2["ranks_agree"] is True
    assert tp2["seed11"] == tp1["seed11"]  # sampling, not only greedy, is layout-independent


def test_a_sample_depends_on_its_seed_prompt_and_number_not_its_company(run):
    """Per-request streams: every token is the one its stream prescribes for that step, and the draws are
    the same beside other prompts, in another order, as copies of the prompt instead of n samples, and in
    token-capped waves (rollout/streams.py)."""
    streams = dict(run["streams"])
    # Each token is the one its stream's uniform for that step picks from a full forward's logits.
    assert all(streams.pop("tokens_as_prescribed"))
    assert streams == {"other_company_and_order": True, "copies_equal_n": True, "capped_waves": True,
                       "samples_of_a_prompt_differ": True}


def test_token_capped_waves_give_the_same_greedy_output(run):
    assert run["small_cap_waves"] > 1
    assert run["waves_greedy"] == [g for g in run["greedy"] for _ in range(2)]


def test_an_end_id_ends_a_sample_and_is_kept_out_of_its_text(run):
    eos = run["eos"]  # the engine stops at EOS or at a second end id, here a token greedy decoding reaches
    assert eos["got"] == eos["expected"]
    assert eos["got"][-1] == eos["token"]
    assert eos["finish"] == "stop"
    assert eos["n_logprobs"] == len(eos["got"])
    assert eos["text"] == eos["text_before_end"]  # a plain-text end piece is not read as the judgment's text


def test_stop_string_ends_a_sample_where_it_completes(run):
    stop = run["stop"]
    assert len(stop["got"]) == stop["expected_len"] < run["max_new"]
    assert stop["got"] == stop["greedy_prefix"]
    assert stop["text"].endswith(stop["string"])
    assert stop["finish"] == "stop"


def test_finish_reasons_stop_and_length(run):
    for tokens, reason in zip(run["greedy"], run["greedy_finish"]):
        if reason == "length":
            assert len(tokens) == run["max_new"]
            assert run["eos_id"] not in tokens
        else:
            assert reason == "stop" and tokens[-1] == run["eos_id"]
    assert set(run["greedy_finish"]) == {"stop", "length"}


def test_optimizer_step_changes_the_policy_the_engine_samples(run):
    step = run["after_step"]
    assert step["skipped"] is False
    assert step["tokens_after"] == step["tokens_before"]
    # An SFT step on this continuation makes it more likely under the engine (no copy, no disk).
    assert step["logprob_sum_after"] > step["logprob_sum_before"] + 1.0
    assert step["logprob_diff_vs_training"] <= LOGPROB_TOL


def test_engine_leaves_the_model_in_training_mode(run):
    assert run["model_training_after_generate"] is True


def test_a_judgment_prompt_with_no_room_is_an_incorrect_judgment_not_an_engine_error(run):
    r = run["too_long_judgments"]
    assert r["finish"][2:] == ["prompt_too_long"] * 2 and "prompt_too_long" not in r["finish"][:2]
    assert all(n + run["max_new"] > r["context_limit"] for n in r["prompt_lengths"][2:])
    assert r["tokens"][2:] == [[], []] and r["texts"][2:] == ["", ""] and r["scores"][2:] == [None, None]
    assert r["correct"][2:] == [False, False]
    assert r["tokens"][:2] == r["alone"] and all(r["tokens"][:2])  # the rest sampled as if alone
    judge = run["too_long_judge"]  # the LLM-as-a-judge baseline's prompts alike
    assert [d["id"] for d in judge] == ["short", "long"]
    assert judge[1] == {"id": "long", "scores": None, "text": ""} and judge[0]["text"]


def test_refit_rollout_layout_follows_training_weights(tp2):
    before, after = tp2["refit_before"], tp2["refit_after"]
    assert before["tokens"] == tp2["greedy"]  # TP=1 rollout copy == TP=2 training model
    assert before["logprob_diff_vs_tp2"] <= LOGPROB_TOL
    assert after["tokens"] == after["tokens_tp2"]  # ... and still after an optimizer step
    assert after["logprob_diff_vs_tp2"] <= LOGPROB_TOL
    assert after["tokens"] != before["tokens"]  # the step changed the policy the copy samples
    assert after["logprob_sum"] == pytest.approx(tp2["after_step"]["logprob_sum_after"], abs=1e-4)


def test_a_bf16_rollout_copy_holds_every_weight_in_bf16(tp2):
    # The local spec leaves norm weights fp32; a cross-rank refit receives into the target's dtype.
    assert tp2["refit_bf16_dtypes"] == ["torch.bfloat16"]


def test_a_rollout_copy_builds_the_training_models_norms(tp2):
    """The copy is built from the same decoder spec: on the CPU every norm, the final one too, is ours."""
    classes = tp2["norm_classes"]
    assert classes["rollout copy"] == classes["training"] == ["megatron_grm.models.rms_norm.RMSNorm"], classes


def test_a_bf16_copy_rolls_out_on_the_cpu_through_the_16bit_decode_kernel(tp1):
    """A bf16 rollout copy, refit from the fp32 training weights: every decode step of every layer takes a
    decode kernel that reads the bf16 cache in place (the C++ one, or torch's fused one without a compiler),
    and its log-probabilities agree with the copy's own forward and with fp32 training at bf16 resolution
    (logits keep 8 significant bits)."""
    check = tp1["bf16_rollout"]
    assert check["dtypes"] == ["torch.bfloat16"] and check["flash_decode"] is True
    assert check["tokens"] == check["rows"] * tp1["max_new"]
    assert check["calls_16bit"] == check["layers"] * (tp1["max_new"] - 1)  # the first token is the prefill's
    assert check["logprob_diff_vs_own_forward"] <= 2e-2
    assert check["logprob_diff_vs_fp32_training"] <= 2e-2
    assert check["tokens_equal_fp32"] >= check["rows"] - 1  # a near-tie may go the other way in bf16
    # The C++ passes take bf16 too: every step's argmax and log-sum-exp over the bf16 logits, every forward's
    # SwiGLUs and its norms with bf16 weights (one with an fp32 weight would stay on torch's mixed-dtype op).
    steps = check["sampling_steps"]
    assert len(steps) == tp1["max_new"] and {dtype for dtype, _ in steps} == {"torch.bfloat16"}
    assert all(fused for _, fused in steps) == check["kernel_built"]
    if check["kernel_built"]:
        elementwise = check["elementwise"]
        assert elementwise["swiglus"] == check["layers"] and elementwise["norms"] > 0
        calls = elementwise["kernel_calls"] + elementwise["module_calls"]
        assert calls == (elementwise["swiglus"] + elementwise["norms"]) * tp1["max_new"]  # each module, each forward
        assert check["norm_weight_dtypes"] == ["torch.bfloat16"]
        assert elementwise["module_calls"] == 0
    # With the size threshold at 0 every bf16 linear layer multiplies through oneDNN on a reordered weight:
    # a bf16 one, or where this CPU has no bf16 GEMM its fp32 copy (the bf16 operands' exact products), which
    # the C++ GEMM multiplies where that is on.
    if check["bf16_gemm_dtype"] == "None":
        pytest.skip("this torch build's oneDNN has no fp32 or bf16 linear: the GEMMs stay on torch's matmul")
    assert check["gemm_layers"] == check["linear_modules"] > 0
    packs = check["gemm_reordered"] + check["gemm_panels"] + check["gemm_amx_tiles"]
    assert packs >= check["linear_modules"] - 1  # a tied output layer reuses the embedding's
    assert check["gemm_calls"] >= check["linear_modules"] * tp1["max_new"] and check["gemm_fallbacks"] == 0
    assert check["bf16_gemm_dtype"] == ("torch.bfloat16" if check["bf16_onednn"] else "torch.float32")
    assert check["gemm_widened"] == (0 if check["bf16_onednn"] else packs)
    kernel = check["linear_kernel_rows"] and not check["bf16_onednn"]  # widened to fp32: the kernel's dtype
    if not kernel:
        assert check["gemm_kernel_calls"] == check["gemm_panels"] == 0
    elif check["linear_kernel_rows"] >= cpu_decode_kernel.ALL_ROWS:
        assert check["gemm_kernel_calls"] == check["gemm_calls"]
    else:  # the decode steps' GEMMs (a few rows) in the kernel, the prefill's on oneDNN
        assert 0 < check["gemm_kernel_calls"] <= check["gemm_calls"]
    # On a CPU with AMX a bf16 GEMM of up to 32 rows (every decode step's: one row per sequence) runs the AMX
    # kernel, on weights packed for its tiles; elsewhere none does.
    if check["amx"] and check["bf16_onednn"] and check["linear_kernel_rows"]:
        assert check["gemm_amx_calls"] >= check["linear_modules"] * (tp1["max_new"] - 1)
        assert check["gemm_amx_tiles"] >= check["linear_modules"] - 1
    else:
        assert check["gemm_amx_calls"] == check["gemm_amx_tiles"] == 0


def test_only_bf16_models_with_plain_attention_may_take_the_dynamic_engine(tp1):
    """Megatron's dynamic engine sends q/k/v straight to flash-attn: fp32 weights would fail there and
    Gemma-2's soft-cap / sliding window / query scale would be dropped, so those stay on the static path."""
    routing = tp1["dynamic_routing"]
    assert routing["backend"] == "static" and routing["missing_runtime"] == "needs CUDA"
    assert "bf16/fp16" in routing["fp32_llama"]
    assert routing["bf16_llama"] is None
    assert "sliding window" in routing["bf16_gemma2"]
    flash = tp1["flash_decode_routing"]
    assert flash["llama"] is None
    assert "core attention ['Gemma2CoreAttention']" in flash["gemma2_softcap_only"]


def test_a_rollout_copy_refit_from_a_pipelined_model_runs_on_its_own_groups(tmp_path):
    """Training PP = 2, rollouts on a one-stage copy: the copy must not talk over the training pipeline."""
    torchrun(Path(__file__).parent / "scripts" / "refit_pp.py", 2,
             ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out.json")], timeout=240)
    out = read_json(tmp_path / "out.json")
    assert out["stages"] == 2 and out["copy_pipeline"] == 1
    assert all(len(t) > 0 for t in out["expected"])
    assert out["refit_per_rank"] == [out["expected"], out["expected"]]  # each rank decodes with the whole copy
