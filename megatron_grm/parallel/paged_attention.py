"""Attention over Megatron-Core's paged KV cache in torch, for the dynamic engine where flash-attn is absent.

Megatron's dynamic engine calls flash-attn directly (``Attention.flash_decode_and_prefill``): a varlen
prefill and a decode over the cache pages a block table points to. A machine with CUDA but no flash-attn
(a pip-installed torch: flash-attn ships no wheels) could not run the engine at all. Here the same two
calls are one batched ``scaled_dot_product_attention``: each request's pages are gathered into a
contiguous key/value run, queries are laid out per request, and a mask keeps each query causal at its
absolute position (a request's new tokens come after its cached ones). Slower than flash-attn's paged
kernels (the gather reads every cached page once per layer and step), so ``rollout.backend=auto`` keeps
the static engine without flash-attn and this runs only when ``backend=dynamic`` asks for the engine.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    kv_lengths: torch.Tensor, block_table: torch.Tensor, softmax_scale: float,
                    max_scores: int = 1 << 28, bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """Causal attention of packed queries over paged keys and values.

    Args:
        q: ``[tokens, heads, dim]``, request after request (``cu_seqlens_q``); rows past the last request's
            are padding.
        k_cache, v_cache: ``[blocks, block_size, kv_heads, dim]``; ``heads`` must be a multiple of ``kv_heads``.
        cu_seqlens_q: ``[requests + 1]`` cumulative query lengths (a padding request adds 0).
        kv_lengths: ``[requests]`` keys per request, its new tokens included (they are already in the cache).
        block_table: ``[requests, max_blocks]`` cache block ids per request (unused entries any value).
        softmax_scale: the logits' scale.
        max_scores: attention scores one SDPA call may hold (heads x queries x keys, padded); requests go
            in groups under it, so a long prefill among many requests does not allocate them all at once.
        bounds: upper bounds on any request's query and key lengths, known on the host (a decode step: 1 and
            the block table's span); without them the exact maxima are read from the device (one sync).

    Returns ``[tokens, heads, dim]``; padding rows are zero.
    """
    tokens, heads, _ = q.shape
    out = torch.zeros_like(q)
    q_lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    kv_lengths = kv_lengths.long()
    if tokens == 0 or kv_lengths.numel() == 0:
        return out
    max_q, max_k = bounds if bounds is not None else torch.stack([q_lengths.max(), kv_lengths.max()]).tolist()
    if max_q == 0 or max_k == 0:
        return out
    block_size = k_cache.shape[1]
    pages = block_table[:, :math.ceil(max_k / block_size)].long().clamp(min=0)
    group = max(1, max_scores // (heads * max_q * pages.shape[1] * block_size))
    for first in range(0, len(kv_lengths), group):
        chunk = slice(first, first + group)
        _attend(q, out, k_cache, v_cache, cu_seqlens_q[:-1][chunk].long(), q_lengths[chunk], kv_lengths[chunk],
                pages[chunk], max_q, softmax_scale)
    return out


def _attend(q, out, k_cache, v_cache, starts, q_lengths, kv_lengths, pages, max_q: int, scale: float) -> None:
    """One SDPA call for a group of requests, written into their rows of ``out``."""
    keys = k_cache[pages].flatten(1, 2)  # [requests, pages * block_size, kv_heads, dim]
    values = v_cache[pages].flatten(1, 2)
    offsets = torch.arange(max_q, device=q.device)
    rows = starts[:, None] + offsets  # [requests, max_q]: each request's query rows
    valid = offsets < q_lengths[:, None]
    queries = q[rows.clamp(max=q.shape[0] - 1)]  # [requests, max_q, heads, dim]
    positions = kv_lengths[:, None] - q_lengths[:, None] + offsets  # absolute position of each query
    key_positions = torch.arange(keys.shape[1], device=q.device)
    mask = (key_positions <= positions[..., None]) & (key_positions < kv_lengths[:, None, None])
    mask &= valid[..., None]
    mask[..., 0] |= ~valid  # a padding query sees one key: no all-masked row (NaN); its output is dropped
    attended = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None],
        scale=scale, enable_gqa=q.shape[1] != keys.shape[2])
    out[rows[valid]] = attended.transpose(1, 2)[valid].to(out.dtype)


def _decode_and_prefill(self, q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, seqlens_k,
                        block_table, is_decode_only):
    """``Attention.flash_decode_and_prefill`` on :func:`paged_attention` (same arguments and output)."""
    assert not self.training and block_table is not None
    scale = getattr(self, "softmax_scale", None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if is_decode_only:  # q: [requests, 1, heads, dim], one new token each; no device read on this hot path
        bounds = (1, block_table.shape[1] * k.shape[1])
        return paged_attention(q[:, 0], k, v, cu_seqlens_q, seqlens_k, block_table, scale, bounds=bounds).unsqueeze(1)
    return paged_attention(q.squeeze(1), k, v, cu_seqlens_q, seqlens_k, block_table, scale).unsqueeze(1)


def install() -> bool:
    """Route Megatron's dynamic-batching attention through :func:`paged_attention` when flash-attn is absent;
    returns whether it did (idempotent; with flash-attn installed nothing changes)."""
    from megatron.core.transformer import attention

    if attention.HAVE_FA3 or attention.flash_attn_varlen_func is not None:
        return False
    if attention.Attention.flash_decode_and_prefill is not _decode_and_prefill:
        attention.Attention.flash_decode_and_prefill = _decode_and_prefill
        # Attention.forward asserts flash-attn >= 2.7.3 for dynamic batching; the version check itself
        # raises without flash-attn installed. Only that module's name is rebound.
        attention.is_fa_min_version = lambda version, check_equality=True: True
        log.info("dynamic engine: flash-attn absent, attention over the paged KV cache through torch SDPA "
                 "(parallel/paged_attention.py)")
    return True
