"""Megatron's trainable linear layers' GEMMs on the CPU: the forward through oneDNN where that is faster, and
a bf16 layer's on fp32 copies where the CPU has no bf16 arithmetic (the last paragraph).

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

bf16 layers on a CPU without bf16 arithmetic (no AVX512-BF16 or AMX: ``onednn_linear.cpu_multiplies_bf16``),
or under a torch whose oneDNN has no bf16 GEMM (the rollout's rule, ``onednn_linear.widens_bf16``), train with
their GEMMs widened: torch's bf16 matmul runs oneDNN's emulation on other AVX-512 CPUs (a fifth
of its fp32 rate, ``onednn_linear``'s docstring) and a generic loop on AVX2 ones. The forward multiplies fp32
copies of the bf16 input and weight (the fp32 GEMM above) and rounds the output to bf16 once; the backward
is Megatron's, inherited, run on fp32 copies of what the forward saved and of the output gradient, its
gradients rounded back to the operands' dtypes (the weight gradient fused into an fp32 ``main_grad`` is
accumulated in fp32, as ``parallel/wgrad_gemm.py`` does for bf16 operands anyway). Products of bf16 values
are exact in fp32 and the sums are fp32, as in a bf16 GEMM: only the summation order differs.
The local spec's SDPA core attention widens bf16 the same way (``models/sdpa_attention.widen_bf16``): torch's
CPU flash attention multiplies its bf16 blocks with the same slow bf16 GEMMs.
``MEGATRON_GRM_WIDEN_BF16_TRAINING=1`` (``0``) widens on any CPU (never).
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_grm.models import sdpa_attention
from megatron_grm.parallel import onednn_linear

log = logging.getLogger(__name__)


def _takes(input: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool) -> bool:
    """Whether the forward GEMM of an fp32 layer goes to oneDNN (where it is installed for that)."""
    return (not sequence_parallel and input.dtype == torch.float32 and input.device.type == "cpu"
            and onednn_linear.worth_packing(weight))


def _widens(input: torch.Tensor, weight: torch.Tensor, sequence_parallel: bool,
            grad_output_buffer: list | None) -> bool:
    """Whether a bf16 layer's GEMMs run on fp32 copies (where that is installed): not where Megatron gathers
    the sequence, defers the weight gradient (it would keep the fp32 output gradient) or shards the weight
    for Megatron-FSDP."""
    return (not sequence_parallel and grad_output_buffer is None and not hasattr(weight, "__fsdp_param__")
            and input.dtype == weight.dtype == torch.bfloat16 and input.device.type == weight.device.type == "cpu")


def _gemm_fp32(rows: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """``rows @ weight.T`` in fp32, through oneDNN where the fp32 forward takes it."""
    if onednn and onednn_linear.worth_packing(weight):
        return torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")
    return torch.matmul(rows, weight.t())


_DUMMY_GRAD_FLAGS = ("grad_added_to_main_grad", "zero_out_wgrad")  # what Megatron's backward reads off the weight


def _forward_class(onednn_forward: bool, widen_bf16: bool) -> type:
    """Megatron's autograd function for its linear layers with the forward's GEMM on oneDNN (fp32 layers,
    where ``onednn_forward``) and a bf16 layer's GEMMs on fp32 copies (where ``widen_bf16``); built when
    installed, so that importing this module does not import Megatron."""
    from megatron.core.tensor_parallel import layers

    megatrons = layers.LinearWithGradAccumulationAndAsyncCommunication

    class CpuTrainingLinear(megatrons):
        """Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` with these GEMMs; its backward."""

        @staticmethod
        @layers.custom_fwd
        def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                    grad_output_buffer, wgrad_deferral_limit, tp_group):
            onednn = onednn_forward and _takes(input, weight, sequence_parallel)
            widened = widen_bf16 and _widens(input, weight, sequence_parallel, grad_output_buffer)
            ctx.widened = widened
            if not (onednn or widened):
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
            if widened:  # one rounding to bf16, as a bf16 GEMM's; the bias added as Megatron adds it
                output = _gemm_fp32(rows.float(), weight.float(), onednn_forward).to(input.dtype)
                if bias is not None:
                    output = output + bias
            else:
                output = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
            # Not a view of the op's result: Megatron adds the residual into this output in place, which
            # autograd forbids on a view made inside a custom Function (torch's matmul does the same).
            return torch.ops.aten._unsafe_view(output, (*input.shape[:-1], weight.shape[0]))

        @staticmethod
        def backward(ctx, grad_output):
            if not ctx.widened:
                return megatrons.backward(ctx, grad_output)
            input, weight = ctx.saved_tensors
            wide_weight = weight.float()
            for flag in _DUMMY_GRAD_FLAGS:  # Megatron's backward sets and reads these on the weight it gets
                if hasattr(weight, flag):
                    setattr(wide_weight, flag, getattr(weight, flag))
            wide = types.SimpleNamespace(**vars(ctx), saved_tensors=(input.float(), wide_weight))
            grads = megatrons.backward(wide, grad_output.float())
            if hasattr(wide_weight, "grad_added_to_main_grad"):
                weight.grad_added_to_main_grad = wide_weight.grad_added_to_main_grad
            dtypes = (input.dtype, weight.dtype, weight.dtype)  # the bias is the weight's dtype, as Megatron's
            return tuple(g.to(dtype) if g is not None else None for g, dtype in zip(grads, dtypes)) + grads[3:]

    CpuTrainingLinear.megatrons = megatrons
    CpuTrainingLinear.onednn_forward = onednn_forward
    CpuTrainingLinear.widen_bf16 = widen_bf16
    return CpuTrainingLinear


# "1": oneDNN's forward on any CPU; "0": torch's matmul; unset: :func:`faster_here` decides.
FORWARD_VARIABLE = "MEGATRON_GRM_ONEDNN_FORWARD"
# "1": a bf16 layer's GEMMs on fp32 copies on any CPU; "0": never; unset: :func:`widens_here` decides.
WIDEN_VARIABLE = "MEGATRON_GRM_WIDEN_BF16_TRAINING"


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


def widens_here() -> tuple[bool, str]:
    """Whether this process's bf16 layers train with their GEMMs on fp32 copies, and why (for the log)."""
    choice = os.environ.get(WIDEN_VARIABLE, "")
    if choice in ("0", "1"):
        return choice == "1", f"{WIDEN_VARIABLE}={choice}"
    # The rollout's rule (onednn_linear.widens_bf16), but for fp32 GEMMs, which torch's matmul runs anyway.
    native = onednn_linear.cpu_multiplies_bf16()
    if not onednn_linear.widens_bf16(onednn_linear.available(torch.bfloat16), True, native):
        return False, "this CPU has bf16 arithmetic"
    if not native:
        return True, "this CPU has no bf16 arithmetic (AVX512-BF16 or AMX)"
    return True, "this torch build has no oneDNN bf16 GEMM"


def install(cuda: bool) -> bool:
    """Make Megatron's linear layers multiply their forward through oneDNN on a CPU where
    :func:`faster_here` says so, and a bf16 layer's GEMMs on fp32 copies where :func:`widens_here` does;
    Megatron's own (torch's matmul) otherwise. Returns whether fp32 forwards take oneDNN. Idempotent; on the
    CPU logs which GEMMs run and why."""
    from megatron.core.tensor_parallel import layers

    onednn, why = faster_here() if not cuda and onednn_linear.available() else (False, "")
    widen, why_widen = widens_here() if not cuda else (False, "")
    current = layers.LinearWithGradAccumulationAndAsyncCommunication
    megatrons = getattr(current, "megatrons", current)
    if (onednn, widen) != (getattr(current, "onednn_forward", False), getattr(current, "widen_bf16", False)):
        layers.LinearWithGradAccumulationAndAsyncCommunication = (
            _forward_class(onednn, widen) if onednn or widen else megatrons)
    sdpa_attention.widen_bf16 = widen  # the SDPA core's bf16 attention likewise
    if onednn:
        log.info("training forward GEMMs: oneDNN for fp32 weights of at least %d elements, torch's matmul for the "
                 "rest (%s; parallel/onednn_training.py)", onednn_linear.PACK_MIN_ELEMENTS, why)
    elif not cuda:
        log.info("training forward GEMMs: torch's matmul (%s; parallel/onednn_training.py)",
                 why or "this torch build has no oneDNN linear ops")
    if not cuda:
        log.info("bf16 layers' training GEMMs and SDPA attention: %s (%s; parallel/onednn_training.py)",
                 "fp32 on their bf16 values, rounded once" if widen else "bf16", why_widen)
    return onednn


def installed() -> bool:
    """Whether Megatron's linear layers now multiply an fp32 layer's forward through oneDNN."""
    from megatron.core.tensor_parallel import layers

    return getattr(layers.LinearWithGradAccumulationAndAsyncCommunication, "onednn_forward", False)


def widening() -> bool:
    """Whether Megatron's linear layers now multiply a bf16 layer's GEMMs on fp32 copies."""
    from megatron.core.tensor_parallel import layers

    return getattr(layers.LinearWithGradAccumulationAndAsyncCommunication, "widen_bf16", False)


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
