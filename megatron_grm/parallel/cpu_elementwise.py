"""A CPU rollout wave's RMSNorms and SwiGLUs in one C++ pass each (``csrc/elementwise.cpp``), fp32 or bf16.

torch runs an fp32 RMSNorm as five elementwise ops and SwiGLU as two, each allocating its output. At a
decode step's 32 rows that is ~25 us a norm and ~50 us a SwiGLU of fixed cost on the 2-core EPYC, against
~11 and ~28 us for the C++ passes (wall time of a call in a loop, hot caches; inside a step, where the KV
and weight streams have emptied the caches, torch's took ~80 and ~125 us); in a prefill the passes read their rows
once instead of several times. The modules' own forwards are swapped for the wave and restored after it,
as :func:`~megatron_grm.parallel.onednn_linear.packed_linears` does for the linears; with grad enabled, or
for an input that is neither fp32 nor bf16 on the CPU (or, for a norm, not of its weight's dtype), a module
runs its own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megatron_grm.models.swiglu import SwiGLU
from megatron_grm.parallel import cpu_decode_kernel


@dataclass
class ElementwiseStats:
    norms: int = 0  # RMSNorm modules on the kernel for the wave
    swiglus: int = 0  # SwiGLU modules on the kernel
    kernel_calls: int = 0
    module_calls: int = 0  # calls that ran the module's own forward (grad on, another dtype or device)


def _kernel_input(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """An input the passes take: inference, on the CPU, in fp32 or bf16 (``dtype``, the norm weight's, when
    given)."""
    return ((x.dtype is dtype if dtype is not None else x.dtype in cpu_decode_kernel.ELEMENTWISE_DTYPES)
            and x.device.type == "cpu" and not torch.is_grad_enabled())


def _norm_forward(norm: torch.nn.RMSNorm, stats: ElementwiseStats) -> Callable[[torch.Tensor], torch.Tensor]:
    own = type(norm).forward.__get__(norm)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps  # torch's default for fp32

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _kernel_input(x, norm.weight.dtype):
            stats.module_calls += 1
            return own(x)
        stats.kernel_calls += 1
        return cpu_decode_kernel.rms_norm(x, norm.weight, eps)

    return forward


def _swiglu_forward(activation: SwiGLU, stats: ElementwiseStats) -> Callable[[torch.Tensor], torch.Tensor]:
    own = type(activation).forward.__get__(activation)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _kernel_input(x):
            stats.module_calls += 1
            return own(x)
        stats.kernel_calls += 1
        return cpu_decode_kernel.swiglu(x)

    return forward


def _kernel_norm(module: torch.nn.Module) -> bool:
    """torch's RMSNorm (Megatron's local spec builds it without apex) over the last dimension with an fp32
    or bf16 weight; other norms (Gemma-2's ``1 + w``, LayerNorm) keep their own forward."""
    return (isinstance(module, torch.nn.RMSNorm) and len(module.normalized_shape) == 1 and module.weight is not None
            and module.weight.dtype in cpu_decode_kernel.ELEMENTWISE_DTYPES and module.weight.device.type == "cpu")


@contextlib.contextmanager
def fused_norms_and_swiglu(model: torch.nn.Module) -> Iterator[ElementwiseStats]:
    """While the block runs, ``model``'s fp32 and bf16 RMSNorms and SwiGLUs run the C++ passes where the kernels'
    library is built (``cpu_decode_kernel``); the stats say how many modules and calls took them."""
    stats = ElementwiseStats()
    taken: list[torch.nn.Module] = []
    if cpu_decode_kernel.available(torch.float32):
        for module in model.modules():
            if _kernel_norm(module):
                module.forward = _norm_forward(module, stats)
                stats.norms += 1
            elif isinstance(module, SwiGLU):
                module.forward = _swiglu_forward(module, stats)
                stats.swiglus += 1
            else:
                continue
            taken.append(module)
    try:
        yield stats
    finally:
        for module in taken:
            del module.forward  # back to the class's method
