"""Identical prompts of a wave are prefilled once; their rows of the KV cache are copies.

GRPO's group, RFT's N judgments per example and voting@k sample several continuations of one example.
Each sample shows the responses in its own random order, so with two responses (pairwise data) a group
holds at most two distinct prompts, whatever its size; with ``shuffle=False`` it holds one.
``transformers.generate(num_return_sequences=n)`` and Megatron's static loop prefill every row; here
the prefill runs on one row per distinct prompt and the cache rows (and last-position logits) are
gathered for the others. Decoding then proceeds per row as before, so draws stay independent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def identical_rows(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, source)``: the first row of each distinct prompt, and for every row the index into
    ``first`` of its prompt; ``None`` when all prompts differ (nothing to share)."""
    index: dict[tuple[int, ...], int] = {}
    first: list[int] = []
    source: list[int] = []
    for row, prompt in enumerate(prompts):
        key = tuple(prompt)
        if key not in index:
            index[key] = len(first)
            first.append(row)
        source.append(index[key])
    if len(first) == len(prompts):
        return None
    return torch.tensor(first), torch.tensor(source)


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
    row r a copy of row ``source[r]``. (``StaticInferenceContext.swap_key_value_dict`` gathers rows the same
    way but asserts the batch keeps its size, so it cannot grow distinct rows into a wave.)"""
    return {layer: tuple(t.index_select(1, source.to(t.device)) for t in tensors) for layer, tensors in cache.items()}
