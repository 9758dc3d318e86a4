"""Sequence parallelism off for rollouts: Megatron-Core 0.16.1's static batching refuses it for dense
models ("Sequence parallellism is only supported for static batching with MoE models"), and a decode step
of one token per sequence has no sequence to split. Training keeps it; a rollout turns it off on the same
model for the duration of the call (Megatron's own ``set_model_to_sequence_parallel``, which flips the
config and every module's flag) and back on afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def sequence_parallel_off(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model`` (an unwrapped GPTModel) not sequence-parallel; restore it afterwards."""
    config = getattr(model, "config", None)
    if not getattr(config, "sequence_parallel", False):
        yield
        return
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    set_model_to_sequence_parallel(model, False)
    try:
        yield
    finally:
        set_model_to_sequence_parallel(model, True)
