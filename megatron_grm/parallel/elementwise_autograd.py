"""RMSNorm and SwiGLU for CPU training: the C++ passes (``csrc/elementwise.cpp``) forward and backward.

torch differentiates an fp32 RMSNorm through its five elementwise ops (square, mean, add eps, rsqrt, two
products), about ten passes over the activations forward and backward, and SwiGLU through silu, two
products and ``silu_backward``, keeping ``silu(gate)`` for the backward. The C++ passes read each input once
forward, and once backward: RMSNorm's backward recomputes a row's ``rsqrt`` from the row it reads anyway,
SwiGLU's recomputes the sigmoid, so neither keeps more than its input. At the RFT-shaped benchmark's
``[1024, 2, 1024]`` / ``[1024, 2, 2 x 2816]`` a norm's forward and backward took 2.2 ms against torch's 10.1
and a SwiGLU's 10.4 against 17.6 on the 2-core Xeon of session 48 (docs/performance.md, item 17).

Same math as torch in fp32 (the sums' order and exp's last bits differ: relative differences ~1e-7 to
1e-6); bf16 inputs are computed in fp32 and rounded once per output. Inputs of another dtype or device,
a norm whose weight's dtype differs from its input's (the local spec's fp32 norm weights in a bf16
model), or a machine without the kernels' library (no C++ compiler, or ``MEGATRON_GRM_CPU_DECODE_KERNEL=0``)
take torch's ops: :func:`takes` decides.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_grm.parallel import cpu_decode_kernel


def takes(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the C++ passes run for input ``x`` (and a norm's ``weight``): on the CPU, fp32 or bf16, the
    weight of ``x``'s dtype, the library built here."""
    return (x.device.type == "cpu" and x.dtype in cpu_decode_kernel.ELEMENTWISE_DTYPES
            and (weight is None or (weight.dtype is x.dtype and weight.device.type == "cpu"))
            and cpu_decode_kernel.available(torch.float32))


class KernelSwiGLU(torch.autograd.Function):
    """``silu(x[..., :f]) * x[..., f:]``; the backward writes both halves of ``x``'s gradient in one pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return cpu_decode_kernel.swiglu(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return cpu_decode_kernel.swiglu_backward(x, grad)


class KernelRMSNorm(torch.autograd.Function):
    """``x * rsqrt(mean(x^2, -1) + eps) * weight``; keeps ``x`` (and the weight) for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return cpu_decode_kernel.rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = cpu_decode_kernel.rms_norm_backward(x, weight, grad, ctx.eps)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None, None)
