"""The GPU path: Megatron-Core's DynamicInferenceEngine (paged KV cache, continuous batching).

Needs CUDA, flash-attn >= 2.7.3 (or flash-attn 3) and bf16/fp16 weights, and runs only models whose
attention is plain causal softmax attention: the engine calls flash-attn directly and bypasses the layer's
core attention, so Gemma-2's logit soft-cap, sliding window and query scale would be lost. Without
flash-attn at all, ``backend="dynamic"`` (asked for explicitly) runs the same attention through torch
(:mod:`megatron_grm.parallel.paged_attention`); ``"auto"`` then picks the static engine.
:func:`dynamic_unsupported` says why a model cannot take this path (None: it can); the engine then
uses the static backend. All requests of a generate call go in at once: the engine itself keeps the
tokens in flight under the KV-cache budget (``buffer_size_gb``, sized here from ``max_tokens_in_flight``), pausing and
resuming requests as blocks free up, so no waves are needed.
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from megatron_grm.parallel import paged_attention
from megatron_grm.parallel.inference_layout import inference_groups
from megatron_grm.rollout.controller import RolloutController, StepCallback, TokenizerShim
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.rollout.static_backend import RawSample, inference_wrapper_config

BLOCK_SIZE_TOKENS = 256
NO_FLASH_ATTN = "needs flash-attn"


def dynamic_unsupported(model, flash_attn_required: bool = True) -> str | None:
    """Why Megatron's dynamic engine cannot generate with ``model`` in this process; None when it can.
    ``flash_attn_required=False`` accepts torch's paged attention where flash-attn is not installed."""
    missing = missing_runtime()
    if missing == NO_FLASH_ATTN and not flash_attn_required:
        missing = None
    return missing or model_unsupported(model)


def missing_runtime() -> str | None:
    """What this process lacks for the dynamic engine (CUDA, a flash-attn its dynamic batching accepts)."""
    if not torch.cuda.is_available():
        return "needs CUDA"
    from megatron.core.transformer import attention

    if attention.HAVE_FA3:
        return None
    if importlib.util.find_spec("flash_attn") is None:
        return NO_FLASH_ATTN
    from megatron.core.utils import is_fa_min_version

    if not is_fa_min_version("2.7.3"):
        return "needs flash-attn >= 2.7.3 (Megatron-Core's dynamic batching asserts it)"
    return None


def model_unsupported(model) -> str | None:
    """What in ``model`` the engine's direct flash-attn calls would get wrong (weights' dtype, attention)."""
    config = model.config
    if config.params_dtype not in (torch.bfloat16, torch.float16):
        return f"flash-attn takes bf16/fp16 weights; this model's are {config.params_dtype}"
    if config.window_size is not None or config.softmax_scale is not None:
        return "the engine's flash-attn call ignores a sliding window and a custom softmax scale"
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_grm.models.sdpa_attention import sdpa_core_attention_class

    plain = [DotProductAttention, sdpa_core_attention_class()]
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        plain.append(TEDotProductAttention)
    except ImportError:
        pass
    for name, module in model.named_modules():
        core = getattr(module, "core_attention", None)
        if core is not None and type(core) not in plain:
            return (f"{name}.core_attention is {type(core).__name__}, which the engine bypasses "
                    "(e.g. Gemma-2's logit soft-cap, sliding window and query scale)")
    return None


def kv_bytes_per_token(model) -> int:
    """Key + value bytes one token occupies in the KV cache of this TP/PP shard."""
    config = model.config
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    return (2 * (config.num_layers // pp) * (config.num_query_groups // tp) * config.kv_channels
            * config.params_dtype.itemsize)


class DynamicBackend:
    """One DynamicInferenceEngine per generate call (its KV buffer is freed afterwards for training)."""

    name = "dynamic"

    def __init__(self, model, shim: TokenizerShim, max_batch_size: int, max_tokens_in_flight: int,
                 vocab_limit: int | None) -> None:
        self.model = model
        self.shim = shim
        self.max_batch_size = max_batch_size
        self.max_tokens_in_flight = max_tokens_in_flight
        self.vocab_limit = vocab_limit
        self.last_evictions = 0  # requests the engine evicted (KV blocks ran out) in the last wave
        self.last_stop_words_restored = 0  # of those, the ones whose stop words keep_stop_words gave back
        paged_attention.install()  # torch's attention over the paged cache, only where flash-attn is absent

    def generate_wave(
        self,
        prompts: Sequence[Sequence[int]],
        keys: Sequence[int],
        sampling: SamplingConfig,
        end_ids: Sequence[int],
        stop_check,
        on_step: StepCallback | None,
    ) -> list[RawSample]:
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
        from megatron.core.inference.engines import DynamicInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
            GPTInferenceWrapper,
        )

        config = self.model.config
        tp = config.tensor_model_parallel_size
        max_len = max(len(p) for p in prompts) + sampling.max_new_tokens
        # At least one full-length request must fit, plus the engine's dummy block.
        budget_tokens = max(self.max_tokens_in_flight, max_len + 2 * BLOCK_SIZE_TOKENS)
        max_requests = max(tp, min(self.max_batch_size, len(prompts)) // tp * tp)
        context = DynamicInferenceContext(
            params_dtype=config.params_dtype,
            num_layers=config.num_layers // config.pipeline_model_parallel_size,
            kv_channels=config.kv_channels,
            num_attention_heads=config.num_query_groups,
            max_sequence_length=max_len,
            buffer_size_gb=budget_tokens * kv_bytes_per_token(self.model) / 1024**3,
            max_requests=max(max_requests, 4),
            # The context pads a prefill to a multiple of its token rounder, so the buffer must be one too.
            max_tokens=DynamicInferenceContext.round_up_tokens(max(budget_tokens // 4, 4 * max_requests, 256), tp),
            block_size_tokens=BLOCK_SIZE_TOKENS,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=config.pipeline_model_parallel_size,
            materialize_only_last_token_logits=True,
        )
        groups, pp_group = inference_groups(self.model)
        wrapper = GPTInferenceWrapper(self.model, inference_wrapper_config(self.model, max_requests), context, groups)
        wrapper.prep_model_for_inference()
        controller = RolloutController(wrapper, self.shim, pp_group=pp_group, vocab_limit=self.vocab_limit)
        controller.set_streams(keys, [len(p) for p in prompts])  # request i is prompts[i]
        engine = DynamicInferenceEngine(controller, context, random_seed=0)  # asserted an int; draws use the streams

        params = sampling.megatron_params()
        params.termination_id = end_ids[0] if end_ids else -1
        if sampling.stop:
            params.stop_words = list(sampling.stop)  # token-level early stop; the exact cut is made afterwards
        try:
            stop_words: dict[int, list[list[int]]] = {}
            for i, prompt in enumerate(prompts):
                engine.add_request(i, list(prompt), params)
                # The engine takes one termination id; the other end ids (a turn-end token) stop a request
                # as one-token stop words, which keep the token, like the termination id.
                request = engine.get_request(i)
                request.stop_word_ids = [*(request.stop_word_ids or []), *([t] for t in end_ids[1:])]
                stop_words[i] = request.stop_word_ids
            records, evictions, restored = [], 0, 0
            while engine.has_unfinished_requests():
                result = engine.step_modern()
                finished = result["finished_request_records"]
                records.extend(finished)
                if engine.evicted_request_count != evictions:
                    evictions = engine.evicted_request_count
                    restored += keep_stop_words(
                        {i: engine.requests[i].record for i in stop_words if i in engine.requests}, stop_words)
                if on_step is not None:
                    on_step(len(result["active_request_ids"]) + len(finished), len(finished))
            self.last_evictions, self.last_stop_words_restored = evictions, restored
            merged = {r.request_id: r.merge() for r in records}
            out = []
            for i in range(len(prompts)):
                request = merged[i]
                if request.failed() or request.generated_log_probs is None:
                    raise RuntimeError(f"dynamic engine: request {i} (prompt of {len(prompts[i])} tokens) ended "
                                       f"{request.status}; its KV budget is {budget_tokens} tokens "
                                       "(rollout.max_tokens_in_flight)")
                tokens = request.generated_tokens
                tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
                out.append((tokens, [float(x) for x in request.generated_log_probs]))
        finally:
            # The context, its block allocator and the engine's callbacks refer to each other: free the KV
            # buffer explicitly, then collect the cycle, so training gets the memory back now (also after
            # a failed request, when the caller may carry on or checkpoint).
            context.deallocate_all_tensors()
            del engine, controller, wrapper, context
            gc.collect()
            torch.cuda.empty_cache()
        return out


def keep_stop_words(records: dict[int, Any], stop_words: dict[int, list[list[int]]]) -> int:
    """Give evicted requests their stop words back.

    Megatron-Core (0.16.1) re-queues an evicted request as a new request object (its record's
    ``checkpoint``: prompt + tokens so far) without the stop words ``add_request`` tokenized, so it would
    decode past a turn-end token or a stop string up to ``max_new_tokens``: no wrong output (``finish``
    cuts at the first end), but the decode steps and KV blocks wasted are the ones that ran short.
    Returns how many requests got them back.
    """
    restored = 0
    for i, record in records.items():
        latest = record[-1]
        if not latest.stop_word_ids and stop_words.get(i):
            latest.stop_word_ids = stop_words[i]
            restored += 1
    return restored
