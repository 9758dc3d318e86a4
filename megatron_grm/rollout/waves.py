"""Memory-bounded batching: split the requests of one generate call into waves.

Megatron-Core's static engine pads a batch to (longest prompt + max_new_tokens) and keeps a KV cache of
that many positions for every row, so the tokens a wave holds in flight are
``rows × (longest prompt + max_new_tokens)``. Sorting by prompt length first keeps the rows of a wave
alike, which also shortens the token-by-token stretch the engine runs for prompts longer than the
shortest one in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_waves(
    prompt_lengths: Sequence[int], max_new_tokens: int, max_tokens_in_flight: int, max_batch_size: int
) -> list[list[int]]:
    """Request indices per wave, shortest prompts first; every wave stays within both caps.

    A single request wider than ``max_tokens_in_flight`` still gets a wave of its own (it cannot be split).
    """
    if max_tokens_in_flight < 1 or max_batch_size < 1:
        raise ValueError(f"max_tokens_in_flight={max_tokens_in_flight} and max_batch_size={max_batch_size} "
                         "must be >= 1")
    order = sorted(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i])
    waves: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = prompt_lengths[i] + max_new_tokens  # ascending order: the widest row of the wave so far
        if current and (len(current) >= max_batch_size or (len(current) + 1) * width > max_tokens_in_flight):
            waves.append(current)
            current = []
        current.append(i)
    if current:
        waves.append(current)
    return waves


def wave_tokens(prompt_lengths: Sequence[int], wave: Sequence[int], max_new_tokens: int) -> int:
    """KV-cache positions a wave occupies in the static engine."""
    return len(wave) * (max(prompt_lengths[i] for i in wave) + max_new_tokens)
