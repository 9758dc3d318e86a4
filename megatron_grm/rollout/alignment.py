"""Prompts of one wave left-padded to a common length, so Megatron's static loop prefills them all at once.

Megatron-Core's static batching prefills only up to the *shortest* prompt of a batch and then runs one
decoding step per position until the longest prompt is consumed: a batch of 16- to 48-token prompts
costs 32 single-token steps before the longest one starts generating. Left-padding every prompt to the
longest lets one prefill cover all of them; the padding is masked out of every attention (a padding
query sees only itself, so no softmax row is empty). Row r's tokens then sit ``pad_r`` positions later
than in an unpadded forward; RoPE attention depends only on position differences, so the scores are the
same (up to rounding) — the property sequence packing in training relies on as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, total_length: int) -> tuple[list[list[int]], torch.Tensor]:
    """(prompts padded on the left to the longest, key padding ``[rows, total_length]`` bool, True = padding)."""
    width = max(len(p) for p in prompts)
    padded = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    pads = torch.tensor([width - len(p) for p in prompts])
    key_padding = torch.arange(total_length)[None, :] < pads[:, None]
    return padded, key_padding


def window_attention_mask(key_padding: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Megatron's bool mask (True = masked out) ``[rows, 1, end - start, end]`` for queries at positions
    ``start..end-1``: causal, and no query sees another position's padding."""
    q_pos = torch.arange(start, end, device=key_padding.device)[:, None]
    k_pos = torch.arange(end, device=key_padding.device)[None, :]
    masked = (k_pos > q_pos)[None] | (key_padding[:, None, :end] & (k_pos != q_pos)[None])
    return masked[:, None]
