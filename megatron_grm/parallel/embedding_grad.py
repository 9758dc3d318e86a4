"""The embedding table's gradient added straight into DDP's ``main_grad``, row by row.

``F.embedding``'s backward materialises a dense ``[vocab, hidden]`` gradient (a zero-fill of the whole table,
then the looked-up rows added in) and Megatron's DDP hook then adds that into ``main_grad``: two passes over
the largest weight of the model per micro-batch, for the few thousand rows a batch touches
(docs/performance.md has the cost on CPU). Here the backward adds those rows into ``main_grad`` with
``index_add_``, as Megatron's fused linear layers do for their weights (``gradient_accumulation_fusion``),
and hands autograd an uninitialised dummy of the table's size, never written, so DDP's hook still runs and
only drops it (``grad_added_to_main_grad``), as Megatron's linear layers do without TE.

Megatron's own lookup runs instead where this would change results or is not possible: no ``main_grad``
(a model outside DDP), no gradient wanted, ``deterministic_mode`` (``index_add_`` on CUDA sums repeated rows
with atomics), and a table tied to the output layer (Megatron then asks for a zeroed dummy and adds
``.grad`` anyway, ``zero_out_wgrad``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class _LookupIntoMainGrad(torch.autograd.Function):
    """``weight[ids]`` whose backward adds the gradient rows into ``weight.main_grad``."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = weight.main_grad
        rows = grad_output.reshape(-1, grad_output.shape[-1]).to(main_grad.dtype)
        main_grad.index_add_(0, ids.reshape(-1), rows)
        weight.grad_added_to_main_grad = True
        # A dummy, never read: DDP's hook sees grad_added_to_main_grad and only drops it.
        return None, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def accumulates_into_main_grad(embedding) -> bool:
    """Whether this lookup can add its gradient straight into ``main_grad`` (see the module docstring)."""
    weight = embedding.weight
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and getattr(weight, "main_grad", None) is not None
        and hasattr(weight, "grad_added_to_main_grad")
        and not getattr(weight, "zero_out_wgrad", False)
        and not embedding.deterministic_mode
    )


@functools.cache
def _main_grad_embedding_class():
    from megatron.core.tensor_parallel import VocabParallelEmbedding
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    class MainGradVocabParallelEmbedding(VocabParallelEmbedding):
        """Megatron's vocabulary-parallel embedding with the lookup of :class:`_LookupIntoMainGrad`."""

        def forward(self, input_: torch.Tensor) -> torch.Tensor:
            if not accumulates_into_main_grad(self):
                return super().forward(input_)
            sharded = self.tp_group.size() > 1
            if sharded:  # ids outside this rank's vocabulary slice read row 0 and are zeroed below
                foreign = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
                input_ = (input_ - self.vocab_start_index).masked_fill(foreign, 0)
            out = _LookupIntoMainGrad.apply(input_, self.weight)
            if sharded:
                out = out.masked_fill(foreign.unsqueeze(-1), 0.0)
            if self.reduce_scatter_embeddings:  # [b, s, h] -> [s, b, h], then scattered over the sequence
                return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(),
                                                                  group=self.tp_group)
            return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)

    return MainGradVocabParallelEmbedding


def install(model: torch.nn.Module) -> int:
    """Switch every vocabulary-parallel embedding in ``model`` to the main_grad lookup; returns how many.

    The switch changes the class only (same parameters, state dict and checkpoints); whether a step takes
    the new path is decided at each forward (:func:`accumulates_into_main_grad`), so a model not (yet)
    wrapped in DDP keeps Megatron's lookup."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    cls = _main_grad_embedding_class()
    switched = 0
    for module in model.modules():
        if type(module) is VocabParallelEmbedding:
            module.__class__ = cls
            switched += 1
    if switched:
        log.info("embedding gradients: rows added into main_grad (parallel/embedding_grad.py) for %d table(s)",
                 switched)
    return switched
