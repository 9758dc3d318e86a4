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
from dataclasses import dataclass

import torch

from megatron_grm.models.sdpa_attention import LEFT_PADS_ATTRIBUTE


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, total_length: int) -> tuple[list[list[int]], torch.Tensor]:
    """(prompts padded on the left to the longest, key padding ``[rows, total_length]`` bool, True = padding)."""
    width = max(len(p) for p in prompts)
    padded = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    pads = torch.tensor([width - len(p) for p in prompts])
    key_padding = torch.arange(total_length)[None, :] < pads[:, None]
    return padded, key_padding


def window_attention_mask(key_padding: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Megatron's bool mask (True = masked out) ``[rows, 1, end - start, end]`` for queries at positions
    ``start..end-1``: causal, and no query sees another position's padding. From position 0 over padding
    that leads each row, the mask carries the rows' padding counts (``sdpa_attention.LEFT_PADS_ATTRIBUTE``,
    what ``left_padding_of_causal`` would find in it; a row of padding only counts ``end - 1``)."""
    q_pos = torch.arange(start, end, device=key_padding.device)[:, None]
    k_pos = torch.arange(end, device=key_padding.device)[None, :]
    padding = key_padding[:, :end]
    masked = (k_pos > q_pos)[None] | (padding[:, None, :] & (k_pos != q_pos)[None])
    mask = masked[:, None]
    if start == 0 and end > 0:
        pads = padding.sum(-1)
        if torch.equal(padding, k_pos < pads[:, None]):  # every row's padding leads it
            setattr(mask, LEFT_PADS_ATTRIBUTE, tuple(pads.clamp(max=end - 1).tolist()))
    return mask


# A wave's prefill is cut into groups of rows of similar length only when the groups, each costing its
# positions plus a forward's fixed cost, save at least this share of the one padded prefill's cost.
LENGTH_GROUPS_MIN_SAVING = 0.05
LENGTH_GROUPS_MAX = 8
# A prefill forward's fixed cost (Megatron's Python and small ops, per layer) in units of one position's
# GEMM work in one layer (2 x its parameters FLOPs): a group costs GROUP_FORWARD_COST_PARAMETERS / (a layer's
# parameters) positions more. Measured on the 2-core EPYC (session 36, bench/rollout.py's 32 prompts of
# 16-48 tokens, hidden 512, 3.15M parameters a layer): a group's forward 5-7 ms, a position 0.12-0.16 ms.
GROUP_FORWARD_COST_PARAMETERS = 1.5e8


def group_cost(layer_parameters: int) -> float:
    """A prefill forward's fixed cost, in positions, for layers of ``layer_parameters`` parameters (local to
    this rank): ~48 positions at hidden 512, ~570 for the CPU demo's tiny GRM, ~3 for a 1B model's layers."""
    return GROUP_FORWARD_COST_PARAMETERS / max(1, layer_parameters)


@dataclass(frozen=True)
class LengthGroup:
    """Rows of a left-padded wave prefilled together over positions ``[start, width)``: ``start`` is the
    group's least padding, so the group's longest prompt starts there and the others after it."""

    rows: torch.Tensor  # int64 row indices into the wave
    start: int


def length_groups(lengths: Sequence[int], max_groups: int = LENGTH_GROUPS_MAX,
                  min_saving: float = LENGTH_GROUPS_MIN_SAVING,
                  cost: float = 0.0) -> list[LengthGroup] | None:
    """The wave's rows cut into at most ``max_groups`` groups of neighbouring lengths whose own prefills
    (each over its longest prompt's positions, plus ``cost`` positions for its forward: :func:`group_cost`)
    cost the least; ``None`` when one prefill over the wave's width is as good: the groups save less than
    ``min_saving`` of its cost (``cost`` = ``math.inf``: never cut).

    In the one padded prefill every row computes the norms, linears and MLP of ``width`` positions; the
    attention already skips the padding (``models/sdpa_attention.attend_left_padded``). With prompts of
    960-1,200 tokens that is ~10% of the prefill's positions, with 16-48 tokens ~35%."""
    if max_groups < 1 or not 0.0 <= min_saving < 1.0:
        raise ValueError(f"max_groups={max_groups} must be >= 1 and min_saving={min_saving} in [0, 1)")
    rows = len(lengths)
    width = max(lengths)
    padded = rows * width
    one_prefill = padded + cost
    if rows < 2 or max_groups < 2 or padded - sum(lengths) - cost < min_saving * one_prefill:
        return None  # too little padding for any cut to save enough
    order = sorted(range(rows), key=lambda r: -lengths[r])  # longest first: a group's first row is its widest
    longest = [lengths[r] for r in order]
    # best[g][j]: the fewest positions covering the first j rows of `order` with g groups; a group of rows
    # i..j-1 costs (j - i) * longest[i].
    inf = float("inf")
    best = [[inf] * (rows + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (rows + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, rows + 1):
            for i in range(g - 1, j):
                covered = best[g - 1][i] + (j - i) * longest[i]
                if covered < best[g][j]:
                    best[g][j], cut[g][j] = covered, i
    groups_used = min(range(1, max_groups + 1), key=lambda g: (best[g][rows] + g * cost, g))
    if groups_used == 1 or best[groups_used][rows] + groups_used * cost > (1.0 - min_saving) * one_prefill:
        return None
    bounds, j = [], rows
    for g in range(groups_used, 0, -1):
        i = cut[g][j]
        bounds.append((i, j))
        j = i
    return [LengthGroup(torch.tensor(sorted(order[i:j])), width - longest[i]) for i, j in reversed(bounds)]
