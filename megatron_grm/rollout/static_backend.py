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
On the CPU (with its decode kernels), a wave of distinct prompts of different lengths is prefilled
in up to eight groups of similar length (:func:`megatron_grm.rollout.alignment.length_groups`, where the
padding they skip outweighs each forward's fixed cost), each over its own positions, so the norms, linears
and MLP skip most of the padding; each group's keys are rotated
from its first position and the decode steps keep that frame
(:func:`megatron_grm.parallel.cpu_decode.rotary_shifted_by`).
Prompts of a wave that begin alike (an example's samples in their shuffled orders) are prefilled once
where they agree, segment by segment (:mod:`megatron_grm.rollout.shared_prefill`; on the GPU static path,
without the CPU decode kernels, identical prompts only), and, when long, those cached keys and values
are read once per decode step for all the rows that hold them (:func:`megatron_grm.parallel.cpu_decode.shared_prompts`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from megatron_grm.parallel import cpu_decode_kernel
from megatron_grm.parallel.cpu_compat import without_cpu_compat
from megatron_grm.parallel.cpu_decode import (
    SHARED_PROMPT_MIN_WIDTH,
    contiguous_decode_cache,
    cpu_prefill_attention,
    enable_cpu_flash_decode,
    kv_cache_like,
    masked_cache_positions,
    rotary_shifted_by,
    shared_prompts,
)
from megatron_grm.parallel.cpu_elementwise import fused_norms_and_swiglu
from megatron_grm.parallel.device import device, use_cuda
from megatron_grm.parallel.inference_layout import inference_groups, tensor_parallel_mappings_skipped_at_one_rank
from megatron_grm.parallel.onednn_linear import packed_linears
from megatron_grm.rollout.alignment import (
    LengthGroup,
    group_cost,
    left_pad,
    length_groups,
    window_attention_mask,
)
from megatron_grm.rollout.controller import RolloutController, StepCallback, StopCheck, TokenizerShim
from megatron_grm.rollout.last_position import final_layer_at_last_position
from megatron_grm.rollout.last_position import unsupported_reason as last_position_unsupported
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.rollout.shared_prefill import (
    MIN_SEGMENT,
    PrefixSegment,
    expand_cache,
    identical_prompts,
    select_rows,
    shared_segments,
)

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


def _layer_parameters(model) -> int:
    """Parameters of the model's first local transformer layer (this rank's shards): what a prefill position
    costs in its GEMMs, against a forward's fixed cost (alignment.group_cost)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layer = next((m for m in model.modules() if isinstance(m, TransformerLayer)), None)
    return 0 if layer is None else sum(p.numel() for p in layer.parameters())


def _wave_wrapper_class() -> type:
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class WavePromptsWrapper(GPTInferenceWrapper):
        """Megatron's GPT wrapper, masking the left padding of the wave's prompts in every window and
        prefilling what prompts share once."""

        key_padding: torch.Tensor | None = None  # [rows, positions], True = padding; None = no padding
        segments: list[PrefixSegment] | None = None  # shared_segments() / identical_prompts() of the wave
        prefill_groups: list[LengthGroup] | None = None  # alignment.length_groups() of the wave

        def get_batch_for_context_window(self, inference_input, context_start_position: int,
                                         context_end_position: int):
            batch = super().get_batch_for_context_window(inference_input, context_start_position,
                                                         context_end_position)
            # A prefill by length groups or shared segments masks each of its forwards itself: the whole
            # wave's [rows, 1, width, width] mask would go unread (~23 ms for 32 rows of 1,200).
            if self.key_padding is not None and self._split_prefill() is None:
                batch["attention_mask"] = window_attention_mask(self.key_padding, context_start_position,
                                                                context_end_position)
            return batch

        def _split_prefill(self) -> str | None:
            """How the forward about to run is split: "groups" (a prefill by length groups), "segments" (a
            prefill of shared prompt segments), or None (one forward over the window)."""
            context = self.inference_context
            if context.sequence_len_offset != 0:
                return None
            if self.prefill_groups is not None and context.materialize_only_last_token_logits:
                return "groups"
            return None if self.segments is None else "segments"

        def run_one_forward_step(self, inference_input, recv_buffer_seq_len=None):
            context = self.inference_context
            split = self._split_prefill()
            if split == "groups":
                return self._prefill_by_length(inference_input, recv_buffer_seq_len)
            if split is None:  # not a prefill to share
                return super().run_one_forward_step(inference_input, recv_buffer_seq_len)
            # Segment by segment, the prefill on one row per group, in a cache of that many rows that the
            # next segment's groups copy; then every row gets its prompt's cache and last logits (the
            # logits of the last segment's positions only: the backend asks for the last token's). Every
            # pipeline stage sees the same prompts, so runs the same forwards.
            cache, parents, logits = None, None, None
            try:
                for segment in self.segments:
                    part = StaticInferenceContext(len(segment.first), context.max_sequence_length)
                    part.materialize_only_last_token_logits = context.materialize_only_last_token_logits
                    if cache is not None:  # a later segment continues its groups' caches (decode kernels)
                        part.key_value_memory_dict = expand_cache(cache, parents.index_select(0, segment.first))
                        part.sequence_len_offset = segment.start
                        part.enable_decode_mode()
                    self.inference_context = part
                    window = _segment_window(inference_input, segment, self.key_padding)
                    padding = None if self.key_padding is None else self.key_padding.index_select(
                        0, segment.first.to(self.key_padding.device))
                    with masked_cache_positions(padding):
                        logits = super().run_one_forward_step(
                            window, None if recv_buffer_seq_len is None else segment.end - segment.start)
                    cache, parents = part.key_value_memory_dict, segment.source
                context.key_value_memory_dict = expand_cache(cache, parents)
                context.sequence_len_offset = part.sequence_len_offset
            finally:
                self.inference_context = context
            return None if logits is None else logits.index_select(0, parents.to(logits.device))

        def _prefill_by_length(self, inference_input, recv_buffer_seq_len):
            # Group by group, the prefill of its rows over its own positions [start, width), in a cache of
            # its own whose position 0 is the group's start (its keys rotated in that frame; the decode steps
            # rotate these rows' queries alike: cpu_decode.rotary_shifted_by). Each group's cache is copied
            # into the wave's at its positions and dropped before the next group runs; the wave's padding
            # positions before a group's start stay zero (masked, and skipped by the decode kernel). Every
            # pipeline stage sees the same prompts, so runs the same forwards.
            context = self.inference_context
            width = inference_input["tokens"].size(1)
            wave_cache: dict = {}
            logits = None
            try:
                for group in self.prefill_groups:
                    positions = width - group.start
                    # The wave's length, not the group's: Megatron keeps a RoPE table per context length.
                    part = StaticInferenceContext(len(group.rows), context.max_sequence_length)
                    part.materialize_only_last_token_logits = True
                    self.inference_context = part
                    padding = self.key_padding.index_select(0, group.rows.to(self.key_padding.device))
                    padding = padding[:, group.start:]
                    window = _group_window(inference_input, group.rows, group.start, padding)
                    with masked_cache_positions(padding):
                        part_logits = super().run_one_forward_step(
                            window, None if recv_buffer_seq_len is None else positions)
                    _place_group_cache(wave_cache, part.key_value_memory_dict, group, positions,
                                       context.max_sequence_length, len(inference_input["tokens"]))
                    part.key_value_memory_dict = {}
                    if part_logits is not None:
                        if logits is None:
                            logits = part_logits.new_empty((len(inference_input["tokens"]), *part_logits.shape[1:]))
                        logits.index_copy_(0, group.rows.to(logits.device), part_logits)
            finally:
                self.inference_context = context
            context.key_value_memory_dict = wave_cache
            context.sequence_len_offset = width
            return logits

    return WavePromptsWrapper


def _tables_in(get_cos_sin: Callable[..., tuple[torch.Tensor, torch.Tensor]],
               dtype: torch.dtype | None) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``get_cos_sin`` with its tables converted to ``dtype`` (None: as computed)."""
    def tables(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = get_cos_sin(*args, **kwargs)
        return (cos, sin) if dtype is None else (cos.to(dtype), sin.to(dtype))

    return tables


@contextlib.contextmanager
def _wave_rope_tables(model):
    """Drop the RoPE tables Megatron's flash-decode path adds during the block. ``GPTModel`` keeps one per
    inference context length (``rotary_pos_emb_cache``, never evicted), and every wave's length (longest
    prompt + max new tokens) is a new one: over an RL run's thousands of waves that is a table per distinct
    length, up to the model's whole context, held on the model's device."""
    tables = [table for m in model.modules()
              if isinstance(table := getattr(m, "rotary_pos_emb_cache", None), dict)]
    before = [set(table) for table in tables]
    # It also computes the table before looking it up (``cache.setdefault(length, get_cos_sin(length))``):
    # every decode step's forward took an arange, an outer product, cos and sin of [length, dim / 2] that it
    # then dropped. Within the wave each length's table is computed once, and kept in the activations' dtype:
    # flash-decode and the prefill's RoPE convert the whole table to it (``.to(query.dtype)``) in every layer,
    # which in bf16 copied it per layer and step and made each step's angles (cpu_decode._step_angles, cached
    # by the table's identity) be taken again per layer (~0.3 ms of a bf16 decode step, session 46).
    dtype = getattr(getattr(model, "config", None), "params_dtype", None)
    rotary = [m for m in model.modules() if callable(getattr(type(m), "get_cos_sin", None))]
    for module in rotary:
        module.get_cos_sin = functools.cache(_tables_in(module.get_cos_sin, dtype))
    try:
        yield
    finally:
        for module in rotary:
            del module.get_cos_sin
        for table, kept in zip(tables, before):
            for length in set(table) - kept:
                del table[length]


def _group_window(batch: dict, rows: torch.Tensor, start: int, padding: torch.Tensor) -> dict:
    """The prefill's inputs (the whole prompt window) for one length group: its rows, its positions from
    ``start``, numbered from 0 (its own frame), and their mask."""
    picked = select_rows({name: value for name, value in batch.items() if name != "attention_mask"}, rows)
    window = {name: value[:, start:] if name == "tokens" else value for name, value in picked.items()}
    positions = window["tokens"].size(1)
    if "position_ids" in window:
        window["position_ids"] = picked["position_ids"][:, :positions]
    window["attention_mask"] = window_attention_mask(padding, 0, positions)
    return window


def _place_group_cache(wave_cache: dict, group_cache: dict, group: LengthGroup, positions: int,
                       max_positions: int, rows: int) -> None:
    """Copy a group's KV cache (Megatron's ``{layer: (keys, values)}``, each ``[positions, rows, ...]``)
    into the wave's, allocated zeroed on first use, at the group's rows and positions ``[start, width)``."""
    for layer, tensors in group_cache.items():
        if layer not in wave_cache:  # in the group's layout (head-major on the CPU: cpu_decode)
            wave_cache[layer] = tuple(kv_cache_like(t, max_positions, rows) for t in tensors)
        for whole, part in zip(wave_cache[layer], tensors):
            whole[group.start:group.start + positions].index_copy_(1, group.rows.to(whole.device), part[:positions])


def _segment_window(batch: dict, segment: PrefixSegment, key_padding: torch.Tensor | None) -> dict:
    """The prefill's inputs (the whole prompt window) cut to a segment's positions and its groups' rows."""
    rows = select_rows(batch, segment.first)
    span = slice(segment.start, segment.end)
    window = {name: value[:, span] if name in ("tokens", "position_ids") else value for name, value in rows.items()}
    if key_padding is not None:
        window["attention_mask"] = window_attention_mask(
            key_padding.index_select(0, segment.first.to(key_padding.device)), segment.start, segment.end)
    elif window.get("attention_mask") is not None:  # causal, shared by the rows
        window["attention_mask"] = window["attention_mask"][..., span, : segment.end]
    return window


class StaticBackend:
    """Generates one wave (a static batch) with a KV cache sized exactly to it."""

    name = "static"

    def __init__(self, model, shim: TokenizerShim, max_batch_size: int, vocab_limit: int | None) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.pad_id = shim.eod
        self.align_prompts = applies_padding_masks(model)
        # Prompts' shared prefixes need a later prefill segment to continue a cache with RoPE at its
        # positions, which the CPU decode kernels do; elsewhere identical prompts share their prefill.
        self.cpu_decode_kernels = not use_cuda() and enable_cpu_flash_decode(model)
        self.share_prompt_prefixes = True
        self.min_shared_segment = MIN_SEGMENT
        self.pack_weights = not use_cuda()  # CPU: GEMMs on oneDNN, weights reordered once per wave
        # and fp32 ones in the C++ GEMM (csrc/linear.cpp) where and at the row counts it is measured faster
        self.linear_kernel_rows = cpu_decode_kernel.linear_kernel_rows() if self.pack_weights else 0
        self.prefill_kernel = not use_cuda()  # CPU: the prefill's causal attention in the C++ kernel
        self.elementwise_kernels = not use_cuda()  # CPU: fp32/bf16 RMSNorms and SwiGLUs as one C++ pass each
        self.final_layer_last_position = True  # the prefill's final layer only where its output is read
        self._logged: set[str] = set()  # _log_once's kinds already logged
        self.last_gemms = None
        self.last_prefill_attention = None  # the last wave's cpu_decode.PrefillStats (None: SDPA throughout)
        self.last_elementwise = None  # the last wave's cpu_elementwise.ElementwiseStats (None: torch's ops)
        self.last_length_groups: list[LengthGroup] | None = None  # the last wave's prefill groups (None: one)
        self.shared_prompt_min_width = SHARED_PROMPT_MIN_WIDTH  # decode reads a shared prompt once from here on
        # Distinct prompts of different lengths: prefill rows of similar length together (alignment.length_groups)
        # where the padding saved outweighs this many positions per forward (math.inf: never); needs the CPU
        # decode kernels' RoPE frames.
        self.length_group_cost = group_cost(_layer_parameters(model))
        log.info("rollout prefill: %s", ("prompts left-padded to the wave's longest, one prefill" + (
            "; prompts of different lengths in groups of similar length" if self.cpu_decode_kernels
            else "")) if self.align_prompts else "Megatron's (to the shortest prompt, then a step per position): "
                 "the attention kernels take no padding mask")
        groups, pp_group = inference_groups(model)
        self.wrapper = _wave_wrapper_class()(
            model, inference_wrapper_config(model, max_batch_size), StaticInferenceContext(1, 1), groups
        )
        self.controller = RolloutController(self.wrapper, shim, pp_group=pp_group, vocab_limit=vocab_limit)

    def _final_layer_at_last_position(self) -> contextlib.AbstractContextManager:
        """The wave's forwards run the final layer at the last position alone when they read only its logits
        (:mod:`megatron_grm.rollout.last_position`)."""
        whole = "switched off" if not self.final_layer_last_position else last_position_unsupported(self.model)
        self._log_once("last_position", "rollout prefill: the final layer %s",
                       "at the last position only" if whole is None else f"at every position ({whole})")
        if whole is not None:
            return contextlib.nullcontext()
        return final_layer_at_last_position(
            self.model, lambda: bool(self.wrapper.inference_context.materialize_only_last_token_logits))

    def _log_once(self, kind: str, message: str, *args) -> None:
        """Each kind of line once per backend: which GEMMs and which prefill attention the waves run."""
        if kind not in self._logged:
            self._logged.add(kind)
            log.info(message, *args)

    def _log_paths(self, gemms, prefill, elementwise) -> None:
        rows = ("any number of rows" if self.linear_kernel_rows >= cpu_decode_kernel.ALL_ROWS
                else f"up to {self.linear_kernel_rows} rows")
        if gemms is None:
            self._log_once("gemms", "rollout GEMMs: torch's matmul")
        else:
            self._log_once("gemms", "rollout GEMMs: oneDNN on weights reordered once per wave for %d linear "
                           "layer(s), torch's matmul for %d (small weights or other dtypes, sequence parallel; "
                           "parallel/onednn_linear.py)%s; %s", gemms.layers, gemms.skipped,
                           (f"; {gemms.widened} bf16 weight(s) multiplied in fp32 (this CPU has no bf16 GEMM)"
                            if gemms.widened else "")
                           + (f"; bf16 GEMMs of up to {cpu_decode_kernel.AMX_ROWS} rows on AMX tiles "
                              f"(csrc/amx_linear.cpp: {gemms.amx_calls} of {gemms.calls} in the first wave)"
                              if gemms.amx_calls else ""),
                           f"fp32 GEMMs of {rows} in the C++ GEMM "
                           f"({gemms.kernel_calls} of {gemms.calls} in the first wave)" if self.linear_kernel_rows else
                           f"the C++ GEMM off ({cpu_decode_kernel.LINEAR_VARIABLE}, or not measured "
                           "faster on this CPU)")
        if prefill is None:
            self._log_once("prefill", "rollout prefill attention: torch's SDPA")
        elif prefill.kernel + prefill.sdpa:  # a wave whose prefill ran no attention says nothing yet
            self._log_once("prefill", "rollout prefill attention: the C++ kernel for %d call(s), torch's SDPA for "
                           "%d (another dtype or head size, bf16 where the CPU has AMX, neither AVX-512 nor AVX2, or "
                           "prompts past cpu_decode.PREFILL_MAX_POSITION_CHANNELS)", prefill.kernel, prefill.sdpa)
        if elementwise is None or not elementwise.kernel_calls:
            self._log_once("elementwise", "rollout norms and activations: torch's ops%s",
                           "" if elementwise is None else f" ({cpu_decode_kernel.describe()}; fp32 and bf16 "
                           "RMSNorm and SwiGLU only)")
        else:
            self._log_once("elementwise", "rollout norms and activations: one C++ pass each for %d RMSNorm and %d "
                           "SwiGLU module(s) (parallel/cpu_elementwise.py), %d of %d calls in the first wave",
                           elementwise.norms, elementwise.swiglus, elementwise.kernel_calls,
                           elementwise.kernel_calls + elementwise.module_calls)

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
        # Rows share prompt positions only when their prompts agree before padding and are padded alike:
        # after it, a prompt that starts with the pad token and a shorter one it ends with look alike but
        # are masked differently.
        segments = None
        if self.share_prompt_prefixes:
            # Segments assume the left-padded layout; Megatron's own handling (no padding masks) pads right.
            aligned = self.align_prompts or len({len(p) for p in prompts}) == 1
            segments = (shared_segments(prompts, self.min_shared_segment) if self.cpu_decode_kernels and aligned
                        else identical_prompts(prompts))
        raw_prompts = prompts
        key_padding = None
        if self.align_prompts and len({len(p) for p in prompts}) > 1:
            prompts, key_padding = left_pad(prompts, self.pad_id, max_len)
            key_padding = key_padding.to(device())
        groups = None
        if key_padding is not None and segments is None and self.cpu_decode_kernels:
            groups = length_groups([len(p) for p in raw_prompts], cost=self.length_group_cost)
            if groups is not None:
                log.debug("wave of %d prompts prefilled in %d length groups starting at %s", len(prompts),
                          len(groups), [g.start for g in groups])
        shift = None
        if groups is not None:
            shift = torch.empty(len(prompts), dtype=torch.long)
            for group in groups:
                shift[group.rows] = group.start
        self.wrapper.key_padding = key_padding
        self.wrapper.segments = segments
        self.wrapper.prefill_groups = groups
        self.last_length_groups = groups
        self.wrapper.inference_context = StaticInferenceContext(len(prompts), max_len)
        self.controller.begin_wave([len(p) for p in prompts], end_ids, sampling.max_new_tokens, keys, stop_check,
                                   on_step)
        params = sampling.megatron_params()
        params.return_log_probs = False  # the controller takes them per step (see controller.py)
        requests = OrderedDict(
            (i, InferenceRequest(request_id=i, prompt="", prompt_tokens=list(p), sampling_params=params))
            for i, p in enumerate(prompts)
        )
        shared = segments if len({len(p) for p in prompts}) == 1 else None
        # On CPU the wave runs with cpu_compat's process-wide torch-function mode off (~1.4 µs per torch call).
        with (without_cpu_compat(), tensor_parallel_mappings_skipped_at_one_rank(),
              masked_cache_positions(key_padding), contiguous_decode_cache(),
              rotary_shifted_by(None if shift is None else shift.to(device())), _wave_rope_tables(self.model),
              shared_prompts(shared, len(prompts[0]), self.shared_prompt_min_width),
              (packed_linears(self.model, len(prompts), self.linear_kernel_rows) if self.pack_weights
               else contextlib.nullcontext()) as gemms,
              cpu_prefill_attention() if self.prefill_kernel else contextlib.nullcontext() as prefill,
              fused_norms_and_swiglu(self.model) if self.elementwise_kernels else contextlib.nullcontext()
              as elementwise,
              self._final_layer_at_last_position()):
            done = self.controller.generate_all_output_tokens_static_batch(requests)
        self.last_gemms = gemms  # what the oneDNN GEMMs did in this wave (None: torch's matmul)
        self.last_prefill_attention = prefill
        self.last_elementwise = elementwise
        self._log_paths(gemms, prefill, elementwise)
        out = []
        for i in range(len(prompts)):
            tokens = done[i].generated_tokens.tolist()
            out.append((tokens, self.controller.logprobs[i, : len(tokens)].tolist()))
        self.wrapper.inference_context = StaticInferenceContext(1, 1)  # drop the KV cache now
        self.wrapper.key_padding = None
        self.wrapper.segments = None
        self.wrapper.prefill_groups = None
        return out
