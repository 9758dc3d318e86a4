"""A rollout prefill's final transformer layer, computed at the last position only.

From a prefill a rollout reads the KV cache and the logits of each row's last position (Megatron's
``materialize_only_last_token_logits``; the static batch left-pads its rows, so that position is the
window's last for every row). Every layer but the final one must run at every position, since the next
layer's keys and values come from its output. The final layer's keys and values come from its *input*,
and only its output at the last position is read: its queries, attention, output projection and MLP at
every other position are work nothing reads. That is 1/L of a prefill's layer work for a model of L layers
(a quarter of ``bench/rollout.py``'s 4-layer model; 2% of Gemma-2-27B's 46).

While :func:`final_layer_at_last_position` is active, two hooks on the final layer skip it: a forward
pre-hook on its core attention keeps the last query (and its row of the mask), so the attention, the output
projection and everything after them see one position; and the residual that the attention's output is
added to is cut to the same position. The kept position's arithmetic is the same, up to the rounding of
different kernels (one query's attention instead of the causal kernel's tile, GEMMs of one row).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def _core_attention_classes() -> tuple[type, ...]:
    """Core attentions that take fewer queries than keys, aligned to the last key, with the mask's rows for
    those queries: the local spec's SDPA core and Gemma-2's. (Transformer Engine's causal kernels align a
    short query block differently across versions, so the TE spec keeps the full layer.)"""
    from megatron_grm.models.gemma2 import core_attention_class
    from megatron_grm.models.sdpa_attention import sdpa_core_attention_class

    return sdpa_core_attention_class(), core_attention_class()


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None when the model's final layer can run at the last position alone; else why not."""
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.utils import unwrap_model

    inner = unwrap_model(model)
    if not getattr(inner, "post_process", False):
        return "this pipeline stage has no output layer (its last layer's output is the next stage's input)"
    config = inner.config
    if config.sequence_parallel or config.context_parallel_size > 1:
        return "sequence or context parallelism splits the positions across ranks"
    if config.mtp_num_layers or config.attention_output_gate or getattr(config, "inference_fuse_tp_communication",
                                                                        False):
        return "multi-token prediction, an attention output gate or fused TP inference reads every position"
    layers = getattr(getattr(inner, "decoder", None), "layers", None)
    layer = layers[-1] if layers else None
    if not isinstance(layer, TransformerLayer):
        return f"the final layer is {type(layer).__name__}, not a TransformerLayer"
    core = getattr(layer.self_attention, "core_attention", None)
    if not isinstance(core, _core_attention_classes()):
        return f"core attention {type(core).__name__} is not the local spec's SDPA core or Gemma-2's"
    if isinstance(layer.self_attn_bda, torch.nn.Module):
        return f"the attention's residual add is a module ({type(layer.self_attn_bda).__name__})"
    return None


@contextlib.contextmanager
def final_layer_at_last_position(model: torch.nn.Module, wanted: Callable[[], bool]) -> Iterator[bool]:
    """While the block runs, the model's final layer computes its output at the last position only, in
    every no-grad forward for which ``wanted()`` is true (the inference context asks for the last
    position's logits alone); its keys and values, and every other layer, at every position. Yields whether
    the hooks are installed (False where :func:`unsupported_reason` gives a reason)."""
    if unsupported_reason(model) is not None:
        yield False
        return
    from megatron.core.utils import unwrap_model

    layer = unwrap_model(model).decoder.layers[-1]

    def last_query(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # Megatron's Attention passes (query, key, value, attention_mask) positionally; a call that does not
        # runs whole (and its output, at every position, keeps the whole residual below).
        if len(args) < 4 or args[0].shape[0] == 1 or torch.is_grad_enabled() or not wanted():
            return None
        query, key, value, mask = args[:4]
        if mask is not None and mask.shape[-2] == query.shape[0]:
            mask = mask[..., -1:, :]
        return (query[-1:], key, value, mask, *args[4:]), kwargs

    original_bda = layer.self_attn_bda

    def residual_at_output(training: bool, fused: bool) -> Callable:
        add = original_bda(training, fused)

        def add_at_kept_positions(x_with_bias: tuple, residual: torch.Tensor, prob: float) -> torch.Tensor:
            kept = x_with_bias[0].shape[0]
            return add(x_with_bias, residual[-kept:] if kept < residual.shape[0] else residual, prob)

        return add_at_kept_positions

    handle = layer.self_attention.core_attention.register_forward_pre_hook(last_query, with_kwargs=True)
    layer.self_attn_bda = residual_at_output
    try:
        yield True
    finally:
        handle.remove()
        layer.self_attn_bda = original_bda
