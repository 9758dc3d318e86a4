"""Prompts of a wave that begin alike are prefilled once where they agree; their rows of the KV cache are copies.

GRPO's group, RFT's N judgments per example and voting@k sample several continuations of one example.
Each sample shows the responses in its own random order, so an example's prompts share the instructions
and the conversation (the head), those that open with the same response share more, and equal orders are
identical prompts. ``transformers.generate(num_return_sequences=n)`` and Megatron's static loop prefill
every row. Here :func:`shared_segments` cuts the wave's cache positions into segments; in each, rows whose
keys and values agree (same left padding, same tokens up to the segment's end) form a group. The prefill
runs segment by segment on one row per group, and the cache rows (and last-position logits) are gathered
for the others. Decoding then proceeds per row, so draws stay independent; ``parallel/cpu_decode``
also reads a shared segment once per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_grm.parallel.cpu_decode import kv_cache_rows

# A segment shorter than this is not worth its own prefill forward and decode pass: it joins the next one.
MIN_SEGMENT = 128
MAX_SEGMENTS = 4


@dataclass(frozen=True)
class PrefixSegment:
    """Cache positions ``[start, end)`` of a wave's left-padded prompts, where row ``r`` holds the same keys
    and values as row ``first[source[r]]``: ``first`` has a row per group, ``source`` each row's group."""

    start: int
    end: int
    first: torch.Tensor
    source: torch.Tensor


def _groups(prompts: Sequence[Sequence[int]], pads: list[int], end: int) -> tuple[list[int], list[int]]:
    """(first, source) of the rows grouped by what they hold in padded positions ``[0, end)``."""
    index: dict[tuple, int] = {}
    first: list[int] = []
    source: list[int] = []
    for row, prompt in enumerate(prompts):
        key = (pads[row], tuple(prompt[:max(0, end - pads[row])]))
        if key not in index:
            index[key] = len(first)
            first.append(row)
        source.append(index[key])
    return first, source


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_segments(prompts: Sequence[Sequence[int]], min_segment: int = MIN_SEGMENT,
                    max_segments: int = MAX_SEGMENTS) -> list[PrefixSegment] | None:
    """The wave's left-padded prompt positions ``[0, width)`` cut where prompts of one padding part, each
    segment with its row groups; ``None`` when no two rows share a token. Cuts are taken from the left,
    each at least ``min_segment`` (>= 2) positions after the last and before the end; beyond
    ``max_segments`` segments, the cuts whose loss shares the fewest row-positions are dropped."""
    if min_segment < 2:
        raise ValueError(f"min_segment must be at least 2 (a segment is a multi-position forward), got {min_segment}")
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    by_pad: dict[int, list[int]] = {}
    for row, pad in enumerate(pads):
        by_pad.setdefault(pad, []).append(row)
    cuts = set()
    for pad, rows in by_pad.items():
        ordered = sorted(rows, key=lambda r: list(prompts[r]))  # neighbours share the longest prefixes
        for a, b in zip(ordered, ordered[1:]):
            # Rows of one length that part at their first token share only padding: prefilling it once
            # saves nothing, and the cut would send the rest of the prefill through the cache-continuing
            # kernels instead of one causal forward.
            if common := _common_length(prompts[a], prompts[b]):
                cuts.add(pad + common)
    groups = {end: _groups(prompts, pads, end) for end in cuts | {width}}
    count = {end: len(first) for end, (first, _) in groups.items()}
    kept, start = [], 0
    for cut in sorted(c for c in cuts if c < width):
        if cut - start >= min_segment and width - cut >= min_segment and count[cut] < count[width]:
            kept.append(cut)
            start = cut
    while len(kept) >= max_segments:  # drop the cut whose loss of sharing costs the fewest row-positions
        bounds = [0, *kept, width]
        cost = [(bounds[i] - bounds[i - 1]) * (count[bounds[i + 1]] - count[bounds[i]])
                for i in range(1, len(kept) + 1)]
        kept.pop(cost.index(min(cost)))
    if not kept and count[width] == len(prompts):
        return None
    return [PrefixSegment(start, end, torch.tensor(groups[end][0]), torch.tensor(groups[end][1]))
            for start, end in zip([0, *kept], [*kept, width])]


def identical_rows(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, source)``: the first row of each distinct prompt, and for every row the index into
    ``first`` of its prompt; ``None`` when all prompts differ (nothing to share)."""
    width = max(len(p) for p in prompts)
    first, source = _groups(prompts, [width - len(p) for p in prompts], width)  # equal prompts pad alike
    if len(first) == len(prompts):
        return None
    return torch.tensor(first), torch.tensor(source)


def identical_prompts(prompts: Sequence[Sequence[int]]) -> list[PrefixSegment] | None:
    """One segment over the whole prompt width, grouping identical prompts (for backends whose later
    prefill segments could not continue a cache); ``None`` when all prompts differ."""
    rows = identical_rows(prompts)
    return None if rows is None else [PrefixSegment(0, max(len(p) for p in prompts), *rows)]


def select_rows(batch: dict, first: torch.Tensor) -> dict:
    """The forward inputs (tokens, positions, a per-row mask) restricted to the rows in ``first``;
    tensors without a per-row leading dimension (a mask shared by all rows) are kept as they are."""
    rows = batch["tokens"].size(0)

    def pick(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == rows:
            return value.index_select(0, first.to(value.device))
        return value

    return {name: pick(value) for name, value in batch.items()}


def expand_cache(cache: dict, source: torch.Tensor) -> dict:
    """Megatron's static KV cache ``{layer: (keys, values)}``, each ``[positions, rows, ...]``, with
    row r a copy of row ``source[r]``, each tensor in its own layout (cpu_decode.head_major_kv's or Megatron's).
    (``StaticInferenceContext.swap_key_value_dict`` gathers rows the same
    way but asserts the batch keeps its size, so it cannot grow distinct rows into a wave.)"""
    return {layer: tuple(kv_cache_rows(t, source) for t in tensors) for layer, tensors in cache.items()}
