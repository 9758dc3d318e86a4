"""The forward GEMM of Megatron's trainable linear layers on the CPU through oneDNN.

At a training micro-batch's row counts (about a thousand tokens) oneDNN's fp32 linear, on the weight as it
is, ran the forward GEMMs of the 156M benchmark model's layers 1.11-1.20x faster than torch's matmul (MKL)
on the project's 2-core AMD EPYC machine, with no reorder of the weight needed there (its reordered layout
gained no more). The backward's GEMMs gain less or nothing (input gradient 1.03-1.16x on a transposed view
of the weight, weight gradient none; ``docs/performance.md``, item 15), so only the forward changes:
:func:`install` makes Megatron's ``linear_with_grad_accumulation_and_async_allreduce`` apply a subclass of
its autograd function whose forward multiplies through ``torch.ops.mkldnn._linear_pointwise`` and records
for the backward what Megatron's forward records. The backward is Megatron's, inherited unchanged: input
gradient, the weight gradient accumulated into ``main_grad``, the tensor-parallel all-reduce.

Megatron's forward runs instead for sequence-parallel layers (their GEMM gathers the sequence first),
non-fp32 or non-CPU operands and weights under ``onednn_linear.PACK_MIN_ELEMENTS``. The arithmetic stays
fp32; only the summation order differs from torch's matmul (relative differences ~1e-6).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from megatron_grm.parallel import onednn_linear

log = logging.getLogger(__name__)


def _takes(input: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool) -> bool:
    return (not sequence_parallel and input.dtype == torch.float32 and input.device.type == "cpu"
            and onednn_linear.worth_packing(weight))


def _forward_class() -> type:
    """Megatron's autograd function for its linear layers with the forward's GEMM on oneDNN (built when
    installed, so that importing this module does not import Megatron)."""
    from megatron.core.tensor_parallel import layers

    megatrons = layers.LinearWithGradAccumulationAndAsyncCommunication

    class OneDNNForwardLinear(megatrons):
        """Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` with this forward; its backward."""

        @staticmethod
        @layers.custom_fwd
        def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                    grad_output_buffer, wgrad_deferral_limit, tp_group):
            if not _takes(input, weight, sequence_parallel):
                return megatrons.forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                         sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group)
            # What the inherited backward reads; main_grad rides on ctx, as Megatron's forward keeps it.
            ctx.save_for_backward(input, weight)
            fused = gradient_accumulation_fusion and hasattr(weight, "main_grad")
            ctx.main_grad = weight.main_grad if fused else None
            ctx.use_bias = bias is not None
            ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
            ctx.allreduce_dgrad = allreduce_dgrad
            ctx.sequence_parallel = sequence_parallel
            ctx.grad_output_buffer = grad_output_buffer
            ctx.wgrad_deferral_limit = wgrad_deferral_limit
            ctx.tp_group = tp_group
            rows = input.reshape(-1, input.shape[-1])
            output = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
            # Not a view of the op's result: Megatron adds the residual into this output in place, which
            # autograd forbids on a view made inside a custom Function (torch's matmul does the same).
            return torch.ops.aten._unsafe_view(output, (*input.shape[:-1], weight.shape[0]))

    OneDNNForwardLinear.megatrons = megatrons
    return OneDNNForwardLinear


def install(cuda: bool) -> bool:
    """On the CPU, make Megatron's linear layers multiply their forward through oneDNN; returns whether
    they do. Idempotent; logs which forward GEMM runs when it installs."""
    from megatron.core.tensor_parallel import layers

    if cuda or not onednn_linear.available():
        return False
    if not hasattr(layers.LinearWithGradAccumulationAndAsyncCommunication, "megatrons"):
        layers.LinearWithGradAccumulationAndAsyncCommunication = _forward_class()
        log.info("training forward GEMMs: oneDNN for fp32 weights of at least %d elements, torch's matmul for "
                 "the rest (parallel/onednn_training.py)", onednn_linear.PACK_MIN_ELEMENTS)
    return True


@contextlib.contextmanager
def megatrons_forward() -> Iterator[None]:
    """Megatron's own forward GEMM (torch's matmul) while the block runs: comparisons with ``transformers``,
    which multiplies with torch's matmul too, then measure the model and not the GEMM's summation order."""
    from megatron.core.tensor_parallel import layers

    current = layers.LinearWithGradAccumulationAndAsyncCommunication
    layers.LinearWithGradAccumulationAndAsyncCommunication = getattr(current, "megatrons", current)
    try:
        yield
    finally:
        layers.LinearWithGradAccumulationAndAsyncCommunication = current
