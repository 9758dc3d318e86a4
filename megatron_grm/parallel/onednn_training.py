"""The forward GEMM of Megatron's trainable linear layers on the CPU through oneDNN, where that is faster.

At a training micro-batch's row counts (about a thousand tokens) oneDNN's fp32 linear, on the weight as it
is, ran the forward GEMMs of the 156M benchmark model's layers 1.11-1.20x faster than torch's matmul (MKL)
on a 2-core AMD EPYC with AVX-512, with no reorder of the weight needed there (its reordered layout gained
no more): 1.06-1.08x per training step. The backward's GEMMs gain less or nothing (input gradient
1.03-1.16x on a transposed view of the weight, weight gradient none; ``docs/performance.md``, item 15).
Elsewhere MKL wins: on an AVX-512/AMX Intel Xeon by 1.05-1.12x per GEMM (no difference a step shows), on
an AVX2-only AMD EPYC by 1.13-1.30x per GEMM and 1.04-1.05x per step (item 18). That fits MKL choosing its
code by CPU vendor, AVX-512 on Intel's only, so :func:`faster_here` picks oneDNN on CPUs with AVX-512 from
other vendors and MKL on the rest; ``MEGATRON_GRM_ONEDNN_FORWARD=1`` (``0``) picks oneDNN (MKL) on any CPU.

Only the forward changes: :func:`install` makes Megatron's ``linear_with_grad_accumulation_and_async_allreduce``
apply a subclass of its autograd function whose forward multiplies through
``torch.ops.mkldnn._linear_pointwise`` and records for the backward what Megatron's forward records. The
backward is Megatron's, inherited unchanged: input gradient, the weight gradient accumulated into
``main_grad``, the tensor-parallel all-reduce.

Megatron's forward runs instead for sequence-parallel layers (their GEMM gathers the sequence first),
non-fp32 or non-CPU operands and weights under ``onednn_linear.PACK_MIN_ELEMENTS``. The arithmetic stays
fp32; only the summation order differs from torch's matmul (relative differences ~1e-6).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

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


# "1": oneDNN's forward on any CPU; "0": torch's matmul; unset: :func:`faster_here` decides.
FORWARD_VARIABLE = "MEGATRON_GRM_ONEDNN_FORWARD"


def onednn_beats_mkl(cpu_capability: str, vendor: str) -> bool:
    """Whether oneDNN's fp32 GEMM outran torch's matmul (MKL) on a training step's forward on such a CPU:
    where it has AVX-512 (``torch.backends.cpu.get_cpu_capability()``) that MKL, by the timings on three CPU
    kinds (the module's docstring), uses on Intel's only."""
    return cpu_capability.startswith("AVX512") and vendor != "GenuineIntel"


def cpu_vendor() -> str:
    """The CPU's vendor string from ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD``), '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def faster_here() -> tuple[bool, str]:
    """Whether this process's training forward GEMMs go to oneDNN, and why (for the log)."""
    choice = os.environ.get(FORWARD_VARIABLE, "")
    if choice in ("0", "1"):
        return choice == "1", f"{FORWARD_VARIABLE}={choice}"
    capability, vendor = torch.backends.cpu.get_cpu_capability(), cpu_vendor() or "unknown vendor"
    return onednn_beats_mkl(capability, vendor), f"{capability} on {vendor}"


def install(cuda: bool) -> bool:
    """Make Megatron's linear layers multiply their forward through oneDNN on a CPU where
    :func:`faster_here` says so, through Megatron's own (torch's matmul) otherwise; returns whether they take
    oneDNN. Idempotent; on the CPU logs which forward GEMM runs and why."""
    from megatron.core.tensor_parallel import layers

    onednn, why = faster_here() if not cuda and onednn_linear.available() else (False, "")
    if onednn != installed():
        current = layers.LinearWithGradAccumulationAndAsyncCommunication
        layers.LinearWithGradAccumulationAndAsyncCommunication = _forward_class() if onednn else current.megatrons
    if onednn:
        log.info("training forward GEMMs: oneDNN for fp32 weights of at least %d elements, torch's matmul for the "
                 "rest (%s; parallel/onednn_training.py)", onednn_linear.PACK_MIN_ELEMENTS, why)
    elif not cuda:
        log.info("training forward GEMMs: torch's matmul (%s; parallel/onednn_training.py)",
                 why or "this torch build has no oneDNN linear ops")
    return onednn


def installed() -> bool:
    """Whether Megatron's linear layers now multiply their forward through oneDNN."""
    from megatron.core.tensor_parallel import layers

    return hasattr(layers.LinearWithGradAccumulationAndAsyncCommunication, "megatrons")


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
