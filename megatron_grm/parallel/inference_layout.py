"""How a rollout runs on a model's layout.

Sequence parallelism off for rollouts: Megatron-Core 0.16.1's static batching refuses it for dense
models ("Sequence parallellism is only supported for static batching with MoE models"), and a decode step
of one token per sequence has no sequence to split. Training keeps it; a rollout turns it off on the same
model for the duration of the call (Megatron's own ``set_model_to_sequence_parallel``, which flips the
config and every module's flag) and back on afterwards.

The process groups a rollout communicates over are the model's own: a rollout copy in another layout
(``rollout/refit.py``) has its own collection, which Megatron's inference wrappers would otherwise replace
with the global (training) groups."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

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


def inference_groups(model: torch.nn.Module) -> tuple[Any, Any]:
    """(process-group collection, pipeline group) for a rollout of ``model`` (an unwrapped GPTModel): its
    own collection when it has one, else Megatron's global groups (None, None before torch.distributed)."""
    groups = getattr(model, "pg_collection", None)
    if groups is not None:
        return groups, groups.pp
    if not torch.distributed.is_initialized():
        return None, None
    from megatron.core import parallel_state

    return None, parallel_state.get_pipeline_model_parallel_group()


# Megatron's tensor-parallel linears and embedding call these around each GEMM: at one rank they return
# their input, through an autograd Function whose dispatch cost ~25-35 us a call on the 2-core EPYC (torch
# profiler; 19 calls a decode step of a 4-layer model: ~0.5 ms of a ~27 ms step).
_TP_MAPPINGS = ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                "gather_from_tensor_model_parallel_region")


@contextlib.contextmanager
def tensor_parallel_mappings_skipped_at_one_rank() -> Iterator[None]:
    """While the block runs (a rollout wave, no autograd), Megatron's linear layers skip the tensor-parallel
    copy / reduce / gather when their group has one rank, where each is the identity; with more ranks they
    run as shipped."""
    from megatron.core.tensor_parallel import layers

    originals = {name: getattr(layers, name) for name in _TP_MAPPINGS}

    def skipped_at_one_rank(mapping):
        def call(input_, group=None):
            if group is not None and group.size() == 1 and not torch.is_grad_enabled():
                return input_
            return mapping(input_, group=group)
        return call

    for name, mapping in originals.items():
        setattr(layers, name, skipped_at_one_rank(mapping))
    try:
        yield
    finally:
        for name, mapping in originals.items():
            setattr(layers, name, mapping)
