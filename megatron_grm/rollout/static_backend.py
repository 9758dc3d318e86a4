"""The CPU (and no-flash-attn GPU) path: Megatron-Core's static-batch generation, one wave at a time.

Megatron's ``GPTInferenceWrapper`` + ``StaticInferenceContext`` (its KV cache) + the static-batch loop of
``TextGenerationController`` do the work. ``StaticInferenceEngine(legacy=True)`` is that same loop behind
a request queue; we feed the controller directly instead, because the engine (a) reseeds the *global*
torch RNG with a fixed seed on every ``generate`` (it would reset the trainer's random stream at every
rollout), (b) draws a per-request progress bar on every rank, and (c) batches by request count, while
we batch by tokens in flight (:mod:`megatron_grm.rollout.waves`) and size each wave's KV cache to it.

Prompts of different lengths are left-padded to the wave's longest (:mod:`megatron_grm.rollout.alignment`)
when the model's core attention applies the padding mask we pass (the local spec's SDPA core, Gemma-2's
core); otherwise Megatron's own handling runs (prefill to the shortest, then a step per position).
Identical prompts of a wave (a group's samples) are prefilled once (:mod:`megatron_grm.rollout.shared_prefill`)
and, when long, their cached keys and values are read once per decode step for all their rows
(:func:`megatron_grm.parallel.cpu_decode.shared_prompts`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from megatron_grm.parallel.cpu_compat import without_cpu_compat
from megatron_grm.parallel.cpu_decode import (
    SHARED_PROMPT_MIN_WIDTH,
    contiguous_decode_cache,
    enable_cpu_flash_decode,
    masked_cache_positions,
    shared_prompts,
)
from megatron_grm.parallel.device import device, use_cuda
from megatron_grm.parallel.inference_layout import inference_groups
from megatron_grm.parallel.onednn_linear import packed_linears
from megatron_grm.rollout.alignment import left_pad, window_attention_mask
from megatron_grm.rollout.controller import RolloutController, StepCallback, StopCheck, TokenizerShim
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.rollout.shared_prefill import expand_cache, identical_rows, select_rows

RawSample = tuple[list[int], list[float]]  # generated token ids, their log-probabilities

log = logging.getLogger(__name__)


def inference_wrapper_config(model, max_batch_size: int):
    """Megatron's InferenceWrapperConfig for a GPTModel: no PP micro-batching, limits from the model."""
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

    config = model.config
    return InferenceWrapperConfig(
        hidden_size=config.hidden_size,
        params_dtype=config.params_dtype,
        inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=model.vocab_size,
        inference_max_requests=max_batch_size,
        inference_max_seq_length=model.max_sequence_length,
        fp32_residual_connection=config.fp32_residual_connection,
    )


def applies_padding_masks(model) -> bool:
    """Whether every core attention of the model applies an explicit padding mask (ours do; TE's causal
    kernels do not), i.e. whether left-padded prompts are safe."""
    from megatron_grm.models.gemma2 import core_attention_class
    from megatron_grm.models.sdpa_attention import sdpa_core_attention_class

    ours = (sdpa_core_attention_class(), core_attention_class())
    cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(isinstance(c, ours) for c in cores)


def _wave_wrapper_class() -> type:
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class WavePromptsWrapper(GPTInferenceWrapper):
        """Megatron's GPT wrapper, masking the left padding of the wave's prompts in every window and
        prefilling identical prompts once."""

        key_padding: torch.Tensor | None = None  # [rows, positions], True = padding; None = no padding
        shared_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # identical_rows() of the wave

        def get_batch_for_context_window(self, inference_input, context_start_position: int,
                                         context_end_position: int):
            batch = super().get_batch_for_context_window(inference_input, context_start_position,
                                                         context_end_position)
            if self.key_padding is not None:
                batch["attention_mask"] = window_attention_mask(self.key_padding, context_start_position,
                                                                context_end_position)
            return batch

        def run_one_forward_step(self, inference_input, recv_buffer_seq_len=None):
            context = self.inference_context
            if self.shared_rows is None or context.sequence_len_offset != 0:  # not a prefill to share
                return super().run_one_forward_step(inference_input, recv_buffer_seq_len)
            first, source = self.shared_rows
            # The prefill on one row per distinct prompt, in a cache of that many rows, then every row
            # gets its prompt's cache and logits. Every pipeline stage sees the same prompts.
            self.inference_context = StaticInferenceContext(len(first), context.max_sequence_length)
            self.inference_context.materialize_only_last_token_logits = context.materialize_only_last_token_logits
            try:
                logits = super().run_one_forward_step(select_rows(inference_input, first), recv_buffer_seq_len)
                context.key_value_memory_dict = expand_cache(self.inference_context.key_value_memory_dict, source)
                context.sequence_len_offset = self.inference_context.sequence_len_offset
            finally:
                self.inference_context = context
            return None if logits is None else logits.index_select(0, source.to(logits.device))

    return WavePromptsWrapper


class StaticBackend:
    """Generates one wave (a static batch) with a KV cache sized exactly to it."""

    name = "static"

    def __init__(self, model, shim: TokenizerShim, max_batch_size: int, vocab_limit: int | None) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.pad_id = shim.eod
        if not use_cuda():
            enable_cpu_flash_decode(model)
        self.align_prompts = applies_padding_masks(model)
        self.share_identical_prompts = True
        self.pack_weights = not use_cuda()  # CPU: GEMMs on oneDNN, weights reordered once per wave
        self._logged_gemms = False
        self.last_gemms = None
        self.shared_prompt_min_width = SHARED_PROMPT_MIN_WIDTH  # decode reads a shared prompt once from here on
        log.info("rollout prefill: %s", "prompts left-padded to the wave's longest, one prefill" if self.align_prompts
                 else "Megatron's (to the shortest prompt, then a step per position): the attention kernels "
                      "take no padding mask")
        groups, pp_group = inference_groups(model)
        self.wrapper = _wave_wrapper_class()(
            model, inference_wrapper_config(model, max_batch_size), StaticInferenceContext(1, 1), groups
        )
        self.controller = RolloutController(self.wrapper, shim, pp_group=pp_group, vocab_limit=vocab_limit)

    def _log_gemms(self, gemms) -> None:
        if self._logged_gemms:
            return
        self._logged_gemms = True
        if gemms is None:
            log.info("rollout GEMMs: torch's matmul")
        else:
            log.info("rollout GEMMs: oneDNN on weights reordered once per wave for %d linear layer(s), "
                     "torch's matmul for %d (small or non-fp32 weights, sequence parallel; "
                     "parallel/onednn_linear.py)", gemms.layers, gemms.skipped)

    def generate_wave(
        self,
        prompts: Sequence[Sequence[int]],
        keys: Sequence[int],
        sampling: SamplingConfig,
        end_ids: Sequence[int],
        stop_check: StopCheck | None,
        on_step: StepCallback | None,
    ) -> list[RawSample]:
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.inference_request import InferenceRequest

        max_len = max(len(p) for p in prompts) + sampling.max_new_tokens
        # Rows share a prefill only when their prompts are equal before padding: after it, a prompt that
        # starts with the pad token and a shorter one it ends with look alike but are masked differently.
        shared_rows = identical_rows(prompts) if self.share_identical_prompts else None
        key_padding = None
        if self.align_prompts and len({len(p) for p in prompts}) > 1:
            prompts, key_padding = left_pad(prompts, self.pad_id, max_len)
            key_padding = key_padding.to(device())
        self.wrapper.key_padding = key_padding
        self.wrapper.shared_rows = shared_rows
        self.wrapper.inference_context = StaticInferenceContext(len(prompts), max_len)
        self.controller.begin_wave([len(p) for p in prompts], end_ids, sampling.max_new_tokens, keys, stop_check,
                                   on_step)
        params = sampling.megatron_params()
        params.return_log_probs = False  # the controller takes them per step (see controller.py)
        requests = OrderedDict(
            (i, InferenceRequest(request_id=i, prompt="", prompt_tokens=list(p), sampling_params=params))
            for i, p in enumerate(prompts)
        )
        shared = self.wrapper.shared_rows if len({len(p) for p in prompts}) == 1 else None
        # On CPU the wave runs with cpu_compat's process-wide torch-function mode off (~1.4 µs per torch call).
        with (without_cpu_compat(), masked_cache_positions(key_padding), contiguous_decode_cache(),
              shared_prompts(*(shared or (None, None)), len(prompts[0]), self.shared_prompt_min_width),
              packed_linears(self.model, len(prompts)) if self.pack_weights else contextlib.nullcontext() as gemms):
            done = self.controller.generate_all_output_tokens_static_batch(requests)
        self.last_gemms = gemms  # what the oneDNN GEMMs did in this wave (None: torch's matmul)
        self._log_gemms(gemms)
        out = []
        for i in range(len(prompts)):
            tokens = done[i].generated_tokens.tolist()
            out.append((tokens, self.controller.logprobs[i, : len(tokens)].tolist()))
        self.wrapper.inference_context = StaticInferenceContext(1, 1)  # drop the KV cache now
        self.wrapper.key_padding = None
        self.wrapper.shared_rows = None
        return out
