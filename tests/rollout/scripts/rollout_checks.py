"""Every rollout-engine claim that needs a real Megatron model, in one torchrun launch per layout.

Builds the tiny model through the Trainer (so the engine wraps the very GPTModel the optimizer updates),
runs the checks and writes their raw outcomes to --out (rank 0); tests/rollout/test_rollout_engine.py
asserts on them. ``--tp 2`` (2 processes) adds the cross-rank and refit (TP=2 training -> TP=1 rollout)
checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path (static engine, gloo) even on a machine with GPUs

import torch  # noqa: E402

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)

TEXTS = ["Hi", "What is 2+2? Answer:", "Tell me a story about a robot who", "Q: name a colour.\nA:"]
MAX_NEW = 20


def causal_mask(s: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_new: int, vocab: int, eos: int) -> list[int]:
    """A plain full-recompute argmax loop: the whole sequence through the model for every new token."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ids = list(prompt)
    for _ in range(max_new):
        s = len(ids)
        logits = model(torch.tensor([ids]), torch.arange(s).unsqueeze(0), causal_mask(s))
        logits = gather_from_tensor_model_parallel_region(logits)[0, -1, :vocab]
        ids.append(int(logits.argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


@torch.no_grad()
def reference_draws(model, prompt: list[int], tokens: list[int], key: int, temperature: float, vocab: int) -> list[int]:
    """The tokens a sample's stream prescribes: at each step, ``draw_tokens`` on a full forward's logits of
    the prefix with the uniform ``stream_uniforms(key, step)``."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_grm.rollout.streams import draw_tokens, stream_uniforms

    ids = list(prompt) + list(tokens)
    logits = model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), causal_mask(len(ids)))
    logits = gather_from_tensor_model_parallel_region(logits)[0, len(prompt) - 1:len(ids) - 1, :vocab].float()
    steps = torch.arange(len(tokens))
    return draw_tokens(logits, temperature, 0, 1.0, stream_uniforms(torch.tensor(key).expand(len(tokens)),
                                                                   steps)).tolist()


def first_k_containing(tokens: list[int], stop: str, decode) -> int:
    """Linear scan (the engine uses a binary search): shortest prefix whose text contains ``stop``."""
    for k in range(1, len(tokens) + 1):
        if stop in decode(tokens[:k]):
            return k
    raise AssertionError(f"{stop!r} not in the greedy text")


def same_runs(runs, others) -> dict:
    """Two lists of generate() calls' samples compared: all tokens equal, the largest log-probability
    difference, and how many tokens the first holds."""
    pairs = [(a, b) for f, p in zip(runs, others) for a, b in zip(f, p)]
    return {
        "tokens_equal": all(a.token_ids == b.token_ids for a, b in pairs),
        "logprob_max_abs_diff": max(abs(x - y) for a, b in pairs for x, y in zip(a.logprobs, b.logprobs)),
        "tokens": sum(len(a.token_ids) for f in runs for a in f),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron_grm.data.packing import collate_padded
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.rollout import RolloutEngine, SamplingConfig, training_logprobs
    from megatron_grm.rollout.streams import request_keys
    from megatron_grm.rollout.waves import plan_waves
    from megatron_grm.stages.common import load_config, prepare_run
    from megatron_grm.stages.sft import SupervisedObjective
    from megatron_grm.train.loop import Trainer

    overrides = [
        "model=tiny", f"parallel.tensor_parallel={args.tp}", "trainer.micro_batch_size=1",
        "trainer.global_batch_size=1", "trainer.seq_length=64", "trainer.max_steps=10",
        f"trainer.run_dir={args.run_dir}", "optimizer.lr=1e-3", "optimizer.min_lr=1e-3",
        "optimizer.warmup_steps=0", "optimizer.decay_style=constant",
    ]
    run = prepare_run(load_config("sft", overrides))
    trainer = Trainer(run)
    model = trainer.unwrapped
    tok = load_tokenizer("char")
    prompts = [tok.encode(t, add_bos=True) for t in TEXTS]
    rank = torch.distributed.get_rank()
    out: dict = {"tp": args.tp, "prompt_lengths": [len(p) for p in prompts], "max_new": MAX_NEW,
                 "tokenizer_vocab": tok.vocab_size, "model_vocab": model.vocab_size, "eos_id": tok.eos_id,
                 "layers_per_stage": len(model.decoder.layers)}

    engine = RolloutEngine(model, tok)
    greedy = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW)

    # 1. Greedy equals a full-recompute argmax loop, for prompts of different lengths in one batch.
    t0 = time.perf_counter()
    g = engine.generate(prompts, n=1, sampling=greedy)
    out["greedy_seconds"] = time.perf_counter() - t0
    out["greedy"] = [s.token_ids for s in g]
    out["greedy_finish"] = [s.finish_reason for s in g]
    out["greedy_logprobs"] = [s.logprobs for s in g]
    out["greedy_reference"] = [reference_greedy(model, p, MAX_NEW, tok.vocab_size, tok.eos_id) for p in prompts]
    out["model_training_after_generate"] = model.training
    out["greedy_training_logprobs"] = training_logprobs(model, [s.sequence for s in g], [len(p) for p in prompts])

    # 1b. The CPU flash-decode kernels (parallel/cpu_decode.py) against Megatron's plain static path, which
    # re-rotates the whole KV cache every step: same greedy tokens and log-probabilities, same draws.
    out["flash_decode"] = bool(model.config.flash_decode)
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW, seed=5)
    fast = [engine.generate(prompts, n=1, sampling=greedy), engine.generate(prompts, n=2, sampling=sampled)]
    model.config.flash_decode = False
    plain = [engine.generate(prompts, n=1, sampling=greedy), engine.generate(prompts, n=2, sampling=sampled)]
    model.config.flash_decode = out["flash_decode"]
    out["plain_vs_flash_decode"] = {
        **same_runs(fast, plain),
    }

    # 1c. Left-aligned prompts (one prefill for the whole wave) against Megatron's own mixed-length handling
    # (prefill to the shortest prompt, then a step per position): same greedy and sampled tokens and
    # log-probabilities (a row's draws are numbered by its generated tokens, so the draws Megatron's path
    # makes for rows still reading their prompt use up none), and the forward count shows which ran (EOS
    # ignored, so every row makes MAX_NEW tokens).
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    full = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW, ignore_eos=True)
    runs = {}
    for aligned in (True, False):
        engine.backend.align_prompts = aligned
        forwards.clear()
        runs[aligned] = [engine.generate(prompts, n=1, sampling=full)]
        runs[f"forwards_{aligned}"] = len(forwards)
        runs[aligned].append(engine.generate(prompts[::-1], n=2, sampling=full))
        runs[aligned].append(engine.generate(prompts, n=2, sampling=SamplingConfig(
            temperature=1.0, max_new_tokens=MAX_NEW, ignore_eos=True, seed=21)))
    engine.backend.align_prompts = True
    hook.remove()
    out["aligned_vs_megatron_mixed_lengths"] = {
        "forwards_aligned": runs["forwards_True"], "forwards_megatron": runs["forwards_False"],
        **same_runs(runs[True], runs[False]),
    }

    # 1c2. A wave of distinct prompts of different lengths is prefilled in groups of similar length
    # (rollout.alignment.length_groups; forced on here, where the tiny model's forward costs more than the
    # padding it would skip): one forward per group
    # over its own positions, each group's cache in the frame of its first position, and the decode steps
    # rotate each row in its group's frame. Same greedy and sampled tokens and log-probabilities as one
    # prefill over the wave's padded width.
    rope_tables = [table for m in model.modules()
                   if isinstance(table := getattr(m, "rotary_pos_emb_cache", None), dict)]
    shapes = []
    hook = model.register_forward_hook(lambda module, args, kwargs, output: shapes.append(list(args[0].shape)),
                                       with_kwargs=True)
    by_length = {}
    cost = engine.backend.length_group_cost
    # And the masks built over the whole wave's prefill window (rows x width x width): only where one forward
    # prefills the wave; the groups' forwards mask themselves.
    from megatron_grm.rollout import static_backend

    window_mask, masks = static_backend.window_attention_mask, []

    def recorded_mask(key_padding, start, end):
        masks.append((len(key_padding), start, end))
        return window_mask(key_padding, start, end)

    static_backend.window_attention_mask = recorded_mask
    for grouped in (True, False):
        engine.backend.length_group_cost = 0.0 if grouped else math.inf
        shapes.clear()
        masks.clear()
        by_length[grouped] = [engine.generate(prompts, n=1, sampling=full)]
        by_length[f"forwards_{grouped}"] = list(shapes)
        by_length[f"wave_masks_{grouped}"] = masks.count((len(prompts), 0, max(len(p) for p in prompts)))
        by_length[f"groups_{grouped}"] = [[sorted(int(r) for r in g.rows), g.start]
                                          for g in engine.backend.last_length_groups or []]
        by_length[grouped].append(engine.generate(prompts, n=1, sampling=SamplingConfig(
            temperature=1.0, max_new_tokens=MAX_NEW, ignore_eos=True, seed=23)))
    static_backend.window_attention_mask = window_mask
    # A wave of another length (fewer new tokens): Megatron would cache a second RoPE table for it. Counted
    # in it: the RoPE tables computed (Megatron computes one per forward before its cache lookup) and the
    # tensor-parallel copy / reduce calls that reach Megatron's mappings (none at one rank).
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel import layers as tp_layers

    counts = {"tables": 0, "mappings": 0, "forwards": 0}
    table_of = RotaryEmbedding.get_cos_sin
    mappings = {name: getattr(tp_layers, name) for name in ("copy_to_tensor_model_parallel_region",
                                                            "reduce_from_tensor_model_parallel_region")}

    def counted(key, function):
        def call(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)
        return call

    # Also counted: the decode steps' reads of the KV cache, whether each found Megatron's cache laid out
    # head-major (cpu_decode.contiguous_decode_cache), and the head-major copies made instead.
    from megatron_grm.parallel import cpu_decode as decode_module

    copy_class, cache_views = decode_module._HeadMajorCache, decode_module._cache_views
    counts.update(copies=0, reads=0, in_place=0)

    def counted_copy(*args, **kwargs):
        counts["copies"] += 1
        return copy_class(*args, **kwargs)

    def counted_views(layer, k_cache, v_cache, *rest):
        counts["reads"] += 1
        counts["in_place"] += int(k_cache.transpose(1, 2).is_contiguous() and v_cache.transpose(1, 2).is_contiguous())
        return cache_views(layer, k_cache, v_cache, *rest)

    decode_module._HeadMajorCache, decode_module._cache_views = counted_copy, counted_views
    # And the steps whose greedy token and log-sum-exp came from the C++ pass (controller.sample_from_logits).
    from megatron_grm.rollout import controller as controller_module

    fused = controller_module.argmax_logsumexp
    counts.update(steps=0, fused=0)

    def counted_fused(logits):
        counts["steps"] += 1
        found = fused(logits)
        counts["fused"] += found is not None
        return found

    controller_module.argmax_logsumexp = counted_fused
    RotaryEmbedding.get_cos_sin = counted("tables", table_of)
    for name, function in mappings.items():
        setattr(tp_layers, name, counted("mappings", function))
    counter = model.register_forward_hook(lambda *_: counts.__setitem__("forwards", counts["forwards"] + 1))
    engine.generate(prompts, n=1, sampling=dataclasses.replace(full, max_new_tokens=MAX_NEW - 5))
    counter.remove()
    RotaryEmbedding.get_cos_sin = table_of
    for name, function in mappings.items():
        setattr(tp_layers, name, function)
    decode_module._HeadMajorCache, decode_module._cache_views = copy_class, cache_views
    controller_module.argmax_logsumexp = fused
    rotary_memo_left = [m for m in model.modules() if "get_cos_sin" in m.__dict__]
    engine.backend.length_group_cost = cost
    hook.remove()
    from megatron.core.transformer.transformer_layer import TransformerLayer

    out["length_groups"] = {
        "default_cost": cost,
        "layer_parameters": sum(p.numel() for p in next(m for m in model.modules()
                                                        if isinstance(m, TransformerLayer)).parameters()),
        "groups": by_length["groups_True"], "groups_off": by_length["groups_False"],
        "wave_lengths": sorted(len(p) for p in prompts),  # a wave holds its prompts shortest first (plan_waves)
        "forwards": by_length["forwards_True"], "forwards_off": by_length["forwards_False"],
        "wave_prefill_masks": by_length["wave_masks_True"], "wave_prefill_masks_off": by_length["wave_masks_False"],
        **same_runs(by_length[True], by_length[False]),
        "sampled_logprob_diff_vs_training": engine.check_logprobs(by_length[True][1]),
        # Megatron's flash-decode path caches a RoPE table per context length on the model; after these
        # waves of two lengths none may be left behind.
        "rope_table_holders": len(rope_tables),
        "rope_tables_left": sum(len(table) for table in rope_tables),
        "rope_tables_computed": counts["tables"], "wave_forwards": counts["forwards"],
        "rotary_memo_left": len(rotary_memo_left), "tp_mapping_calls": counts["mappings"],
        "decode_cache_reads": counts["reads"], "decode_reads_in_place": counts["in_place"],
        "head_major_copies": counts["copies"],
        "sampling_steps": counts["steps"], "fused_sampling_steps": counts["fused"],
        "kernel_built": decode_module.cpu_decode_kernel._library() is not None,
        "tp": args.tp,
    }

    # 1c3. The prefill's causal attention in the C++ kernel (parallel/cpu_decode.cpu_prefill_attention)
    # against torch's SDPA: same greedy and sampled tokens and log-probabilities, sampled log-probabilities
    # that match training (whose forwards never take the kernel), and the kernel uninstalled after a wave.
    from megatron_grm.models import sdpa_attention
    from megatron_grm.parallel import cpu_decode_kernel as prefill_kernels

    by_kernel, stats = {}, {}
    for on in (True, False):
        engine.backend.prefill_kernel = on
        by_kernel[on] = [engine.generate(prompts, n=1, sampling=full), engine.generate(prompts, n=1, sampling=(
            SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW, ignore_eos=True, seed=29)))]
        last = engine.backend.last_prefill_attention
        stats[on] = None if last is None else dataclasses.asdict(last)
    engine.backend.prefill_kernel = True
    head_dim = model.config.kv_channels
    out["prefill_kernel"] = {
        "available": prefill_kernels.prefill_available(model.config.params_dtype, head_dim),
        "layers": len(model.decoder.layers), "stats": stats[True], "stats_off": stats[False],
        "override_left_installed": sdpa_attention.prefill_attention_override is not None,
        **same_runs(by_kernel[True], by_kernel[False]),
        "sampled_logprob_diff_vs_training": engine.check_logprobs(by_kernel[True][1]),
    }

    # 1c4. The prefill's final layer at the last position alone (rollout.last_position): its MLP sees one
    # position per row in every forward (prefill and decode) where it saw the prompt's width before, with the
    # same greedy and sampled tokens and log-probabilities in one padded prefill, in length groups, and for
    # identical prompts prefilled once; the hooks are gone after each wave.
    final = model.decoder.layers[-1]
    bda, mlp_positions = final.self_attn_bda, []
    hook = final.mlp.register_forward_hook(lambda module, args, output: mlp_positions.append(args[0].shape[0]))
    at_last, positions_seen = {}, {}
    for on in (True, False):
        engine.backend.final_layer_last_position = on
        mlp_positions.clear()
        at_last[on] = [engine.generate(prompts, n=1, sampling=full)]
        positions_seen[on] = list(mlp_positions)
        engine.backend.length_group_cost = 0.0
        at_last[on].append(engine.generate(prompts, n=1, sampling=full))
        engine.backend.length_group_cost = cost
        at_last[on].append(engine.generate(prompts[:2], n=3, sampling=SamplingConfig(
            temperature=1.0, max_new_tokens=MAX_NEW, ignore_eos=True, seed=31)))
    engine.backend.final_layer_last_position = True
    hook.remove()
    out["final_layer_at_last_position"] = {
        "mlp_positions": positions_seen[True], "mlp_positions_off": positions_seen[False],
        "hooks_left": len(final.self_attention.core_attention._forward_pre_hooks) + (final.self_attn_bda is not bda),
        **same_runs(at_last[True], at_last[False]),
        "sampled_logprob_diff_vs_training": engine.check_logprobs(at_last[True][2]),
    }

    # 1d. Identical prompts (a group's samples) are prefilled once: the prefill's batch is the number of
    # distinct prompts, and greedy tokens and log-probabilities equal those of a prefill on every row.
    # The wave mixes lengths (left padding) and puts copies apart from each other. With the shared-prompt
    # threshold at 0 the decode steps also read each prompt's cache once for its rows (cpu_decode), which
    # these short prompts would otherwise not use; the calls into that kernel are counted.
    import megatron_grm.parallel.cpu_decode as cpu_decode
    import megatron_grm.parallel.cpu_decode_kernel as cpu_decode_kernel
    import megatron_grm.rollout.shared_prefill as shared_prefill

    shared_decode_calls = []
    real_shared_decode = cpu_decode._decode_over_shared_prompts

    def counted_shared_decode(*args, **kwargs):
        shared_decode_calls.append(1)
        return real_shared_decode(*args, **kwargs)

    cpu_decode._decode_over_shared_prompts = counted_shared_decode
    batches = []
    hook = model.register_forward_hook(lambda module, args, kwargs, output: batches.append(args[0].shape),
                                       with_kwargs=True)
    wave = [prompts[0], prompts[2], prompts[0], prompts[1], prompts[2], prompts[2]]
    shared, decode_calls = {}, {}
    for share, min_width in (("prefill", None), ("none", None), ("decode", 0)):
        engine.backend.share_prompt_prefixes = share != "none"
        if min_width is not None:
            engine.backend.shared_prompt_min_width = min_width
        batches.clear()
        shared_decode_calls.clear()
        shared[share] = engine.generate(wave, n=2, sampling=full)
        shared[f"prefill_{share}"] = list(batches[0])
        decode_calls[share] = len(shared_decode_calls)
    hook.remove()
    drawn = engine.generate(prompts[1:2], n=8, sampling=SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW, seed=9))
    decode_calls["draws"] = len(shared_decode_calls) - decode_calls["decode"]
    engine.backend.share_prompt_prefixes = True
    engine.backend.shared_prompt_min_width = cpu_decode.SHARED_PROMPT_MIN_WIDTH
    cpu_decode._decode_over_shared_prompts = real_shared_decode

    def diff(a_runs, b_runs):
        return max(abs(x - y) for a, b in zip(a_runs, b_runs) for x, y in zip(a.logprobs, b.logprobs))

    out["shared_prefill"] = {
        "rows": len(wave) * 2, "distinct": 3,
        "prefill_shape_shared": shared["prefill_prefill"], "prefill_shape_every_row": shared["prefill_none"],
        "tokens_equal": all(a.token_ids == b.token_ids for a, b in zip(shared["prefill"], shared["none"])),
        "logprob_max_abs_diff": diff(shared["prefill"], shared["none"]),
        "tokens": sum(len(a.token_ids) for a in shared["prefill"]),
        "shared_decode_calls": decode_calls,
        "shared_decode_tokens_equal": all(a.token_ids == b.token_ids for a, b in zip(shared["decode"], shared["none"])),
        "shared_decode_logprob_max_abs_diff": diff(shared["decode"], shared["none"]),
        "group_distinct_draws": len({tuple(s.token_ids) for s in drawn}),
        "group_logprob_diff_vs_training": engine.check_logprobs(drawn),
    }

    # 1d2. Prompts that agree on a head and differ after it (an example's responses in shuffled orders),
    # with a second example of another length (left padding): cut into segments (forced short here), the
    # prefill runs segment by segment on one row per group, and decode reads each shared segment once per
    # group. Same greedy tokens and log-probabilities as a prefill and decode on every row.
    blocks = [tok.encode(t) for t in ("first answer. ", "second one! ", "and a third.")]
    heads = [tok.encode("Judge these:", add_bos=True), tok.encode("Rate:", add_bos=True)]
    orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (0, 1, 2), (2, 1, 0), (0, 2, 1)]
    shuffled = [head + [t for i in order for t in blocks[i]] for head in heads for order in orders]
    shuffled += [heads[1] + blocks[1] + blocks[0]] * 2  # another length: rows padded differently
    batches.clear()
    hook = model.register_forward_hook(lambda module, args, kwargs, output: batches.append(tuple(args[0].shape)),
                                       with_kwargs=True)
    engine.backend.min_shared_segment, engine.backend.shared_prompt_min_width = 2, 0
    shared_decode_calls.clear()
    cpu_decode._decode_over_shared_prompts = counted_shared_decode
    by_segment = engine.generate(shuffled, sampling=full)
    segment_forwards, segment_decode_calls = list(batches), len(shared_decode_calls)
    engine.backend.share_prompt_prefixes = False
    batches.clear()
    every_row = engine.generate(shuffled, sampling=full)
    every_row_forwards = list(batches)
    hook.remove()
    engine.backend.share_prompt_prefixes = True
    engine.backend.min_shared_segment = shared_prefill.MIN_SEGMENT
    engine.backend.shared_prompt_min_width = cpu_decode.SHARED_PROMPT_MIN_WIDTH
    cpu_decode._decode_over_shared_prompts = real_shared_decode
    segments = shared_prefill.shared_segments(shuffled, min_segment=2)
    out["prefix_segments"] = {
        "rows": len(shuffled), "segments": [[seg.start, seg.end, len(seg.first)] for seg in segments],
        "forwards": segment_forwards[: len(segments)], "every_row_first_forward": every_row_forwards[0],
        "shared_decode_calls": segment_decode_calls,
        "tokens_equal": all(a.token_ids == b.token_ids for a, b in zip(by_segment, every_row)),
        "logprob_max_abs_diff": diff(by_segment, every_row),
        "tokens": sum(len(a.token_ids) for a in by_segment),
    }

    # 1e. The GEMMs on oneDNN with each weight reordered once per wave (parallel/onednn_linear.py) against
    # torch's matmul. The tiny model's weights are all under the size threshold, so by default only the C++
    # GEMM's calls take them (none goes to oneDNN); with the threshold at 0 every linear layer takes the
    # oneDNN path: same greedy and sampled tokens, log-probabilities within round-off; layers, reorders and
    # GEMM calls counted. The same again with the C++ GEMM instead of oneDNN (its weights packed once, its
    # calls counted).
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    import megatron_grm.parallel.onednn_linear as onednn_linear

    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    by_default = engine.backend.last_gemms
    linear_kernel_by_default = engine.backend.linear_kernel_rows
    threshold, onednn_linear.PACK_MIN_ELEMENTS = onednn_linear.PACK_MIN_ELEMENTS, 0
    runs = {}
    for kernel in (False, True):  # oneDNN, then every fp32 GEMM in the C++ kernel (csrc/linear.cpp)
        engine.backend.linear_kernel_rows = cpu_decode_kernel.ALL_ROWS if kernel else 0
        packed = engine.generate(prompts, n=2, sampling=sampled)
        forwards.clear()
        hook = model.register_forward_hook(lambda *_: forwards.append(1))
        packed += engine.generate(prompts, n=1, sampling=greedy)  # one wave: its forwards are counted
        hook.remove()
        runs[kernel] = (packed, engine.backend.last_gemms, len(forwards))
    engine.backend.linear_kernel_rows = linear_kernel_by_default
    onednn_linear.PACK_MIN_ELEMENTS = threshold
    engine.backend.pack_weights = False
    matmul = engine.generate(prompts, n=2, sampling=sampled) + engine.generate(prompts, n=1, sampling=greedy)
    elementwise = engine.backend.last_elementwise  # the greedy wave's norms and SwiGLUs (C++ by default)
    engine.backend.elementwise_kernels = False  # torch's RMSNorm and SwiGLU ops instead
    torch_elementwise = engine.generate(prompts, n=2, sampling=sampled) + engine.generate(prompts, n=1,
                                                                                          sampling=greedy)
    engine.backend.elementwise_kernels = True
    engine.backend.pack_weights = True
    packed, gemms, forward_count = runs[False]
    kernel_packed, kernel_gemms, kernel_forwards = runs[True]
    out["onednn_gemms"] = {
        "available": onednn_linear.available(), "layers_by_default": by_default.layers,
        "default_calls": by_default.calls, "default_kernel_calls": by_default.kernel_calls,
        "default_reordered": by_default.reordered, "default_panels": by_default.panels,
        "linear_modules": len(linears), "layers": gemms.layers, "reordered": gemms.reordered,
        "calls": gemms.calls, "fallbacks": gemms.fallbacks, "forwards": forward_count,
        "kernel_calls_off": gemms.kernel_calls, "panels_off": gemms.panels,
        "restored": all("_forward_impl" not in m.__dict__ for m in linears),
        "tokens_equal": all(a.token_ids == b.token_ids for a, b in zip(packed, matmul)),
        "logprob_max_abs_diff": diff(packed, matmul),
        "tokens": sum(len(a.token_ids) for a in packed),
    }
    out["linear_kernel"] = {
        "by_default": linear_kernel_by_default, "enabled_here": cpu_decode_kernel.linear_kernel_rows(),
        "built": cpu_decode_kernel._library() is not None, "layers": kernel_gemms.layers,
        "calls": kernel_gemms.calls, "kernel_calls": kernel_gemms.kernel_calls, "panels": kernel_gemms.panels,
        "reordered": kernel_gemms.reordered, "fallbacks": kernel_gemms.fallbacks, "forwards": kernel_forwards,
        "tokens_equal": all(a.token_ids == b.token_ids for a, b in zip(kernel_packed, matmul)),
        "logprob_max_abs_diff": diff(kernel_packed, matmul),
        "tokens": sum(len(a.token_ids) for a in kernel_packed),
    }

    # 1e'. The wave's RMSNorms and SwiGLUs as one C++ pass each (parallel/cpu_elementwise.py) against torch's
    # ops: same tokens, log-probabilities within round-off, every module's forward restored after the wave.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]  # the local spec's (models/rms_norm.py)
    out["elementwise"] = {
        "norm_modules": len(norms), "norms": elementwise.norms, "swiglus": elementwise.swiglus,
        "kernel_calls": elementwise.kernel_calls, "module_calls": elementwise.module_calls,
        "torch_ops_stats": engine.backend.last_elementwise,
        "restored": all("forward" not in m.__dict__ for m in model.modules()),
        "tokens_equal": all(a.token_ids == b.token_ids for a, b in zip(matmul, torch_elementwise)),
        "logprob_max_abs_diff": diff(matmul, torch_elementwise),
        "tokens": sum(len(a.token_ids) for a in matmul),
    }

    # 1f. A wave runs with the CPU layer's process-wide torch-function mode off (parallel/cpu_compat.py,
    # without_cpu_compat): the model's forwards inside generate see torch-function handling disabled, the
    # reference forwards outside it (and everything after the wave) see it on again. Section 1's
    # greedy == full-recompute check compares the two.
    seen = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch._C._is_torch_function_enabled()))
    engine.generate(prompts[:2], n=1, sampling=greedy)
    in_wave = list(seen)
    seen.clear()
    reference_greedy(model, prompts[0], 2, tok.vocab_size, tok.eos_id)
    hook.remove()
    out["torch_function_in_wave"] = {"in_wave": sorted(set(in_wave)), "forwards_in_wave": len(in_wave),
                                     "outside": sorted(set(seen)), "cuda": torch.cuda.is_available()}

    # 1f'. Rows share a prefill only when their prompts are equal before left-padding: a prompt that starts
    # with the pad token (EOS) and the shorter prompt it ends with pad to the same row, masked differently.
    y = prompts[0]
    x = [tok.eos_id] + y
    pair = engine.generate([x, y], n=1, sampling=SamplingConfig(greedy=True, max_new_tokens=8, ignore_eos=True))
    recomputed = training_logprobs(model, [s.sequence for s in pair], [len(x), len(y)])
    out["padded_lookalike"] = {"logprob_max_abs_diff": max(abs(a - b) for s, r in zip(pair, recomputed)
                                                             for a, b in zip(s.logprobs, r)),
                               "tokens": sum(len(s.token_ids) for s in pair)}

    # 1g. FP8 is off while a wave runs (models/precision.fp8_suspended): Transformer Engine runs a GEMM in
    # FP8 only on a multiple of 8 rows, which decode steps are not. The model is marked FP8 here only around
    # the call; every forward inside must see it cleared, and the mark must be back afterwards.
    fp8_seen = []
    hook = model.register_forward_hook(lambda module, *_: fp8_seen.append(str(module.config.fp8)))
    model.config.fp8 = "hybrid"
    try:
        engine.generate(prompts[:1], n=1, sampling=greedy)
        fp8_after = model.config.fp8
    finally:
        model.config.fp8 = None
        hook.remove()
    out["fp8_in_wave"] = {"in_wave": sorted(set(fp8_seen)), "forwards": len(fp8_seen), "after": fp8_after}

    # 1h. Sequence parallelism is off while a wave runs (parallel/inference_layout.py): Megatron-Core's
    # static generation refuses a dense model with it on. A TP=2 model is made sequence-parallel for the
    # call only; its forwards inside must see it off, the same tokens come out, and it is back on after.
    if args.tp == 2:
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        sp_seen = []
        hook = model.register_forward_hook(lambda module, *_: sp_seen.append(module.config.sequence_parallel))
        set_model_to_sequence_parallel(model, True)
        try:
            sp_tokens = [s.token_ids for s in engine.generate(prompts, n=1, sampling=greedy)]
            sp_after = [model.config.sequence_parallel, model.decoder.layers[0].mlp.linear_fc1.sequence_parallel]
        finally:
            set_model_to_sequence_parallel(model, False)
            hook.remove()
        out["sp_in_wave"] = {"in_wave": sorted(set(sp_seen)), "forwards": len(sp_seen), "after": sp_after,
                             "tokens_equal": sp_tokens == out["greedy"]}

    # 2. Sampled tokens' logprobs match a training forward (plain softmax, whatever the sampling knobs).
    settings = {
        "temperature_1": SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW, seed=7),
        "temperature_0.7_top_k_5": SamplingConfig(temperature=0.7, top_k=5, max_new_tokens=MAX_NEW, seed=7),
        "top_p_0.9": SamplingConfig(top_p=0.9, max_new_tokens=MAX_NEW, seed=7),
        "temperature_1.5": SamplingConfig(temperature=1.5, max_new_tokens=MAX_NEW, seed=7),
    }
    out["logprob_diff"], out["max_token_id"], out["n_group"] = {}, {}, {}
    for name, cfg in settings.items():
        samples = engine.generate(prompts, n=3, sampling=cfg)
        out["logprob_diff"][name] = engine.check_logprobs(samples)
        out["max_token_id"][name] = max(max(s.token_ids, default=0) for s in samples)
        out["n_group"][name] = [[s.prompt_index, s.sample_index] for s in samples]
    debug_engine = RolloutEngine(model, tok, debug_logprobs=True)
    debug_engine.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=MAX_NEW, seed=3))
    out["debug_logprob_diff"] = debug_engine.last_logprob_diff

    # 3. Same seed -> same samples; different seed -> different samples (temperature 1).
    def draw(seed: int) -> list[list[int]]:
        return [s.token_ids for s in engine.generate(prompts, n=2, sampling=SamplingConfig(seed=seed,
                                                                                            max_new_tokens=MAX_NEW))]
    a, b, c = draw(11), draw(11), draw(12)
    out["same_seed_equal"] = a == b
    out["different_seed_equal"] = a == c
    out["seed11"] = a
    # Generating does not touch the global torch RNG the trainer uses.
    state = torch.get_rng_state()
    draw(13)
    out["global_rng_untouched"] = bool(torch.equal(state, torch.get_rng_state()))

    # 4. Memory-bounded waves give the same greedy output as one batch.
    widest = max(len(p) for p in prompts) + MAX_NEW
    small = RolloutEngine(model, tok, max_tokens_in_flight=2 * widest)
    out["small_cap_waves"] = len(plan_waves([len(p) for p in prompts for _ in range(2)], MAX_NEW, 2 * widest, 256))
    out["waves_greedy"] = [s.token_ids for s in small.generate(prompts, n=2, sampling=greedy)]

    # 4b. Per-request streams: a sample depends on its seed, its prompt and its number only. The same
    #     prompts sampled in other company, another order, as copies instead of n, and in capped waves.
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW, seed=11)
    by_prompt = {i: out["seed11"][2 * i:2 * i + 2] for i in range(len(prompts))}
    last, first = len(prompts) - 1, 0
    reordered = [s.token_ids for s in engine.generate([prompts[last], prompts[first]], n=2, sampling=sampled)]
    copies = [s.token_ids for s in engine.generate([prompts[last], prompts[last]], n=1, sampling=sampled)]
    capped = [s.token_ids for s in small.generate(prompts, n=2, sampling=sampled)]
    keys = request_keys(11, prompts, 2)
    drawn = engine.generate(prompts, n=2, sampling=dataclasses.replace(sampled, temperature=0.7))
    prescribed = [reference_draws(model, s.prompt_ids, s.token_ids, keys[k], 0.7, tok.vocab_size)
                  for k, s in enumerate(drawn)]
    out["streams"] = {
        "tokens_as_prescribed": [s.token_ids == p for s, p in zip(drawn, prescribed)],
        "other_company_and_order": reordered == by_prompt[last] + by_prompt[first],
        "copies_equal_n": copies == by_prompt[last],
        "capped_waves": capped == out["seed11"],
        "samples_of_a_prompt_differ": all(a != b for a, b in by_prompt.values()),
    }

    # 5. EOS and stop strings end a sample (the terminating token / string is kept); else "length".
    k = next(i for i, t in enumerate(out["greedy"]) if len(t) >= 6)
    eos_tok = out["greedy"][k][4]
    eos_engine = RolloutEngine(model, tok, end_ids=(tok.eos_id, eos_tok))  # EOS and a turn-end id
    e = eos_engine.generate(prompts[k:k + 1], sampling=greedy)[0]
    out["eos"] = {"token": eos_tok, "expected": out["greedy"][k][: out["greedy"][k].index(eos_tok) + 1],
                  "got": e.token_ids, "finish": e.finish_reason, "n_logprobs": len(e.logprobs), "text": e.text,
                  "text_before_end": tok.decode(e.token_ids[:-1], skip_special=True)}
    decode = lambda ids: tok.decode(ids, skip_special=True)  # noqa: E731
    k = max(range(len(prompts)), key=lambda i: len(decode(out["greedy"][i])))
    text = decode(out["greedy"][k])
    stop = text[len(text) // 3: len(text) // 3 + 3]
    s1 = engine.generate(prompts[k:k + 1], sampling=SamplingConfig(greedy=True, max_new_tokens=MAX_NEW,
                                                                   stop=(stop, "\x7f never")))[0]
    out["stop"] = {"string": stop, "expected_len": first_k_containing(out["greedy"][k], stop, decode),
                   "got": s1.token_ids, "text": s1.text, "finish": s1.finish_reason,
                   "greedy_prefix": out["greedy"][k][: len(s1.token_ids)]}

    # 6. In-process weight updates: one SFT step on the greedy continuation of prompt 0 raises its
    #    log-probability under the engine (no copy, no disk), and the engine still agrees with training.
    seq = g[0].sequence
    batch = collate_padded([(seq, [0] * len(prompts[0]) + [1] * len(g[0].token_ids))], seq_length=64,
                           pad_id=tok.pad_id)
    refit_engine = None
    if args.tp == 2:
        from megatron_grm.rollout.refit import build_inference_model

        rollout_model = build_inference_model(run.model, run.precision, tensor_parallel=1,
                                              vocab_size=model.vocab_size)
        refit_engine = RolloutEngine(rollout_model, tok, source_model=model)
        from megatron_grm.models.precision import PrecisionConfig

        bf16_copy = build_inference_model(run.model, PrecisionConfig("bf16"), tensor_parallel=1,
                                          vocab_size=model.vocab_size)
        out["refit_bf16_dtypes"] = sorted({str(p.dtype) for p in bf16_copy.parameters()})
        out["norm_classes"] = {name: sorted({f"{type(m).__module__}.{type(m).__name__}" for m in copy.modules()
                                             if "norm" in type(m).__name__.lower()})
                               for name, copy in (("training", model), ("rollout copy", rollout_model))}
        del bf16_copy
        r = refit_engine.generate(prompts, sampling=greedy)
        out["refit_before"] = {"tokens": [s.token_ids for s in r],
                               "logprob_diff_vs_tp2": max(abs(x - y) for s, t in zip(r, g)
                                                          for x, y in zip(s.logprobs, t.logprobs))}
    result = trainer.train_step([batch], SupervisedObjective())
    after = engine.generate(prompts, sampling=greedy)
    out["after_step"] = {
        "loss": result.loss, "skipped": result.skipped,
        "tokens_before": g[0].token_ids, "tokens_after": after[0].token_ids,
        "logprob_sum_before": g[0].logprob_sum, "logprob_sum_after": after[0].logprob_sum,
        "logprob_diff_vs_training": engine.check_logprobs(after),
    }
    if refit_engine is not None:
        r = refit_engine.generate(prompts, sampling=greedy)
        out["refit_after"] = {"tokens": [s.token_ids for s in r], "tokens_tp2": [s.token_ids for s in after],
                              "logprob_sum": r[0].logprob_sum,
                              "logprob_diff_vs_tp2": max(abs(x - y) for s, t in zip(r, after)
                                                         for x, y in zip(s.logprobs, t.logprobs))}

    # 7. Which models Megatron's dynamic engine may run (it calls flash-attn directly, bypassing core
    #    attention): the routing decision on real built models; this CPU process has no CUDA at all.
    if args.tp == 1:
        from megatron_grm.models.config import ModelConfig
        from megatron_grm.models.precision import PrecisionConfig
        from megatron_grm.models.provider import build_model
        from megatron_grm.rollout.dynamic_backend import missing_runtime, model_unsupported

        def built(family: str, **extra):
            cfg = ModelConfig(family=family, num_layers=1, hidden_size=64, ffn_hidden_size=128,
                              num_attention_heads=4, num_query_groups=2, vocab_size=128, **extra)
            return build_model(cfg, run.parallel, PrecisionConfig("bf16"), use_te=False)

        gemma2 = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                      sliding_window=32)
        out["dynamic_routing"] = {
            "backend": engine.backend.name, "missing_runtime": missing_runtime(),
            "fp32_llama": model_unsupported(model),
            "bf16_llama": model_unsupported(built("llama")),
            "bf16_gemma2": model_unsupported(built("gemma2", **gemma2)),
        }
        # The CPU flash-decode path bypasses the core attention too: Gemma-2's soft-capping core must keep
        # it off even where nothing else (a custom softmax scale, a window) would.
        from megatron_grm.parallel.cpu_decode import _supported

        out["flash_decode_routing"] = {
            "llama": _supported(built("llama")),
            "gemma2_softcap_only": _supported(built("gemma2", attn_logit_softcapping=50.0)),
        }

        # Gemma-2's core attention (soft-capping, a sliding window narrower than the prompts + judgments)
        # also attends from the final layer's last position alone, with the same tokens and log-probabilities.
        torch.manual_seed(3)
        gemma_cfg = ModelConfig(family="gemma2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                                num_attention_heads=4, num_query_groups=2, vocab_size=tok.vocab_size,
                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                                sliding_window=24)
        gemma = build_model(gemma_cfg, run.parallel, PrecisionConfig("fp32"), use_te=False)
        gemma_engine = RolloutEngine(gemma, tok)
        from megatron_grm.rollout.last_position import unsupported_reason

        gemma_runs = {}
        for on in (True, False):
            gemma_engine.backend.final_layer_last_position = on
            gemma_runs[on] = [gemma_engine.generate(prompts, n=1, sampling=full), gemma_engine.generate(
                prompts, n=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW, ignore_eos=True,
                                                      seed=37))]
        out["final_layer_at_last_position_gemma2"] = {
            "unsupported": unsupported_reason(gemma), "lengths": [len(p) + MAX_NEW for p in prompts],
            **same_runs(gemma_runs[True], gemma_runs[False]),
        }

    # 8. sample_judgments never hands the engine a prompt without room for the judgment: that request is an
    #    incorrect judgment with finish_reason "prompt_too_long"; the others are sampled as they would be alone.
    from megatron_grm.data.examples import Example, Turn
    from megatron_grm.rollout.judgments import sample_judgments

    short = Example((Turn("user", "2+2?"),), ("4", "5"), 0, source="t", id="short")
    long = Example((Turn("user", "x" * (engine.context_limit - 10)),), ("4", "5"), 0, source="t", id="long")
    judging = SamplingConfig(max_new_tokens=MAX_NEW, seed=5)
    both = sample_judgments(engine, tok, [short, long], 2, judging, "too-long", variant="compact", chat=False)
    alone = sample_judgments(engine, tok, [short], 2, judging, "too-long", variant="compact", chat=False)
    # The same for the LLM-as-a-judge baseline's prompts (evaluation): no choice, not an engine error.
    from megatron_grm.stages.eval_draws import JUDGE
    from megatron_grm.stages.evaluate import BenchmarkSpec, EvalSettings, Job, _judge_draws

    judge_settings = EvalSettings(benchmarks=[BenchmarkSpec("b", "unused")], max_new_tokens=MAX_NEW, chat=False)
    judge = _judge_draws(engine, tok, Job("b", JUDGE, 1, 0, [short, long]), [short, long], judge_settings,
                         "too-long", 5)
    out["too_long_judge"] = [{"id": d.example_id, "scores": d.scores, "text": d.text} for d in judge]
    out["too_long_judgments"] = {
        "context_limit": engine.context_limit,
        "prompt_lengths": [len(j.prompt_ids) for j in both],
        "finish": [j.finish_reason for j in both], "correct": [j.correct for j in both],
        "tokens": [j.token_ids for j in both], "texts": [j.text for j in both],
        "scores": [j.scores for j in both], "alone": [j.token_ids for j in alone],
    }

    # 9. A bf16 copy of the model rolls out on the CPU (refit from the fp32 training weights before every
    #    call): decode steps take torch's fused CPU attention kernel over the cache in place, and the
    #    log-probabilities agree with the copy's own training forward at bf16 resolution.
    if args.tp == 1:
        from megatron_grm.models.precision import PrecisionConfig
        from megatron_grm.rollout.refit import build_inference_model

        bf16_model = build_inference_model(run.model, PrecisionConfig("bf16"), tensor_parallel=1,
                                           vocab_size=model.vocab_size)
        bf16_engine = RolloutEngine(bf16_model, tok, source_model=model)
        calls_16bit = []  # parts through the C++ kernel, or torch's fused one where the kernel cannot be built
        real_16bit, real_native = cpu_decode._fused_part, cpu_decode_kernel.attend
        cpu_decode._fused_part = lambda *a, **k: calls_16bit.append(1) or real_16bit(*a, **k)
        cpu_decode_kernel.attend = lambda *a, **k: calls_16bit.append(1) or real_native(*a, **k)
        threshold, onednn_linear.PACK_MIN_ELEMENTS = onednn_linear.PACK_MIN_ELEMENTS, 0  # the tiny model's too
        from megatron_grm.rollout import controller as controller_module

        sampling_16bit, real_fused = [], controller_module.argmax_logsumexp  # each step's logits: fused or not
        controller_module.argmax_logsumexp = lambda logits: (
            lambda found: sampling_16bit.append((str(logits.dtype), found is not None)) or found)(real_fused(logits))
        b16 = bf16_engine.generate(prompts, n=1, sampling=full)
        controller_module.argmax_logsumexp = real_fused
        onednn_linear.PACK_MIN_ELEMENTS = threshold
        cpu_decode._fused_part, cpu_decode_kernel.attend = real_16bit, real_native
        elementwise_16bit = bf16_engine.backend.last_elementwise
        gemms = bf16_engine.backend.last_gemms
        fp32_rows = engine.generate(prompts, n=1, sampling=full)
        own = training_logprobs(bf16_model, [s.sequence for s in b16], [len(p) for p in prompts])
        out["bf16_rollout"] = {
            "dtypes": sorted({str(p.dtype) for p in bf16_model.parameters()}),
            "flash_decode": bool(bf16_model.config.flash_decode), "calls_16bit": len(calls_16bit),
            "layers": len(bf16_model.decoder.layers), "tokens": sum(len(s.token_ids) for s in b16),
            "logprob_diff_vs_own_forward": max(abs(x - y) for s, r in zip(b16, own) for x, y in zip(s.logprobs, r)),
            "logprob_diff_vs_fp32_training": bf16_engine.check_logprobs(b16),
            "tokens_equal_fp32": sum(a.token_ids == b.token_ids for a, b in zip(b16, fp32_rows)),
            "rows": len(b16),
            "linear_modules": sum(isinstance(m, (ColumnParallelLinear, RowParallelLinear))
                                  for m in bf16_model.modules()),
            "gemm_layers": gemms.layers, "gemm_reordered": gemms.reordered, "gemm_calls": gemms.calls,
            "gemm_fallbacks": gemms.fallbacks, "gemm_widened": gemms.widened, "gemm_panels": gemms.panels,
            "gemm_kernel_calls": gemms.kernel_calls, "linear_kernel_rows": bf16_engine.backend.linear_kernel_rows,
            "gemm_amx_tiles": gemms.amx_tiles, "gemm_amx_calls": gemms.amx_calls,
            "amx": cpu_decode_kernel.amx_available(),
            # oneDNN's bf16 linear on the CPU's own bf16 arithmetic (elsewhere bf16 weights are widened)
            "bf16_onednn": onednn_linear.available(torch.bfloat16) and onednn_linear.cpu_multiplies_bf16(),
            "bf16_gemm_dtype": str(onednn_linear.gemm_dtype(torch.bfloat16)),
            "sampling_steps": sampling_16bit,
            "elementwise": None if elementwise_16bit is None else dataclasses.asdict(elementwise_16bit),
            "kernel_built": cpu_decode_kernel._library() is not None,
            "norm_weight_dtypes": sorted({str(m.weight.dtype) for m in bf16_model.modules()
                                          if isinstance(m, torch.nn.RMSNorm)}),
        }
        del bf16_engine, bf16_model

    # All model-parallel ranks drew the same tokens.
    mine = [out["greedy"], out["seed11"], out["after_step"]["tokens_after"]]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    out["ranks_agree"] = all(x == gathered[0] for x in gathered)

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(out, f)
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
