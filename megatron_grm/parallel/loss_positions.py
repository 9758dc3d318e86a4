"""Project onto the vocabulary only the positions the loss reads.

SFT on a judgment and GRPO on a sampled judgment read log-probabilities at the response tokens only
(about a fifth of a GRM sequence: a ~1,000-token prompt, a ~250-token judgment). Megatron's GPTModel runs
its output layer on every position: the ``[tokens, hidden] x [hidden, vocab]`` GEMM, its two backward
GEMMs, the cross-entropy and the ``[tokens, vocab]`` logits in memory. Selecting the loss positions from
the final hidden states first gives the same numbers at a fraction of that cost, which matters most for
large vocabularies (Gemma-2: 256k).

The selection is a forward pre-hook on the output layer, installed for one forward call. Under sequence
parallelism each TP rank holds a slice of the sequence; the hook gathers the full sequence (its backward
takes this rank's slice of a gradient the output layer has already all-reduced) and runs the output layer
without its own sequence-parallel gather for that call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class LossPositions:
    """The ``[batch, seq]`` positions where ``loss_mask`` is non-zero, in the order the output layer sees
    them (sequence-major, as Megatron lays hidden states out ``[seq, batch, hidden]``).

    A micro-batch with no loss token (a zero-weight padding copy) keeps its first position, so the output
    layer still takes part in the graph; :meth:`scatter` reads 0 there, like every other position.
    """

    def __init__(self, loss_mask: torch.Tensor) -> None:
        where = loss_mask.t() != 0
        self.placeholder = not bool(where.any())
        if self.placeholder:
            where = where.clone()
            where[0, 0] = True
        self.where = where  # [seq, batch], bool
        self.shape = tuple(loss_mask.shape)

    @property
    def count(self) -> int:
        return int(self.where.sum())

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` → ``[1, n]``: the values at the kept positions, as a one-row batch."""
        return values.t()[self.where].unsqueeze(0)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``[1, n]`` → ``[batch, seq]`` with zeros elsewhere (differentiable in ``values``)."""
        batch, seq = self.shape
        out = values.new_zeros(seq, batch).masked_scatter(self.where, values.reshape(-1))
        if self.placeholder:  # still in the graph, but its value is not a loss token's
            out = out.masked_fill(self.where, 0.0)
        return out.t()


def find_output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output layer of a (possibly DDP / Float16Module-wrapped) GPTModel; None on a pipeline stage
    without one."""
    inner = model
    while not hasattr(inner, "output_layer") and hasattr(inner, "module"):
        inner = inner.module
    if not getattr(inner, "post_process", False):
        return None
    return getattr(inner, "output_layer", None)


@contextmanager
def output_at(model: torch.nn.Module, positions: LossPositions) -> Iterator[bool]:
    """Within the block, the model's output layer sees only ``positions`` (its input becomes ``[n, 1, hidden]``,
    so logits are ``[n, 1, vocab]`` and labels must be ``positions.gather(labels)``). Yields whether this
    pipeline stage has an output layer at all (if not, the model's output is hidden states, untouched)."""
    layer = find_output_layer(model)
    if layer is None:
        yield False
        return
    sequence_parallel = bool(getattr(layer, "sequence_parallel", False))

    def select(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # The output layer, run without sequence parallelism, all-reduces its input gradient over TP;
            # the gather's backward must then only split it (not reduce-scatter it a second time).
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=getattr(module, "tp_group", None))
            module.sequence_parallel = False
        if hidden.shape[:2] != positions.where.shape:
            raise ValueError(f"output layer input {tuple(hidden.shape)} does not match the loss mask "
                             f"[batch, seq] = {list(positions.shape)}")
        return (hidden[positions.where].unsqueeze(1), *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()
        layer.sequence_parallel = sequence_parallel
