"""Weight-gradient accumulation fused into the GEMM without apex: apex's ``fused_weight_gradient_mlp_cuda``
contract, which Megatron-Core's linear layers call when ``gradient_accumulation_fusion`` is on.

Without it, every linear's backward writes a fresh ``weight.grad`` and Megatron's DDP hook then adds it
into the bucket's ``main_grad``: one more pass over every weight per micro-batch, a weight-sized allocation,
and on a GPU in bf16 a weight gradient rounded to bf16 before it is summed in fp32. With it the
weight-gradient GEMM accumulates straight into ``main_grad`` (beta 1, inside the BLAS call), as apex's
kernel does: on a GPU, bf16/fp16 operands with an fp32 ``main_grad`` go through cuBLAS's mixed-precision
GEMM (``torch.addmm`` with ``out_dtype``, torch >= 2.8), the same fp32 accumulation and output as apex.
"""

from __future__ import annotations

import logging
import sys

import torch

log = logging.getLogger(__name__)


_OVERWRITE = "_grm_overwrite"


def mark_overwrite(main_grad: torch.Tensor) -> None:
    """Make the next GEMM into ``main_grad`` overwrite it instead of adding (parallel/grad_zeroing.py)."""
    setattr(main_grad, _OVERWRITE, True)


def take_overwrite(main_grad: torch.Tensor) -> bool:
    """Whether ``main_grad`` was marked for overwriting; clears the mark."""
    marked = getattr(main_grad, _OVERWRITE, False)
    if marked:
        setattr(main_grad, _OVERWRITE, False)
    return marked


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` (2-D operands, as Megatron passes them); ``=`` when
    ``main_grad`` is marked for overwriting (beta 0: what it held is not read, NaN included)."""
    beta = 0 if take_overwrite(main_grad) else 1
    if main_grad.is_cuda and total_input.dtype != main_grad.dtype:
        torch.addmm(main_grad, grad_output.t(), total_input, main_grad.dtype, beta=beta, out=main_grad)
    else:
        main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype), beta=beta)


wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32  # a bf16/fp16 main_grad: operands of its own dtype, plain addmm_


def mixed_precision_gemm_available() -> bool:
    """Whether torch has the bf16-operands-into-fp32 GEMM on CUDA (``aten::addmm.dtype_out``)."""
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def kernel_in_use() -> str:
    """The weight-gradient kernel Megatron's own linears call when fusion is on (TE's layers use TE's)."""
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is sys.modules[__name__]:
        return "torch addmm into main_grad, parallel/wgrad_gemm.py"
    return "apex fused_weight_gradient_mlp_cuda"


def install(cuda: bool) -> str | None:
    """Make Megatron's linears fuse the weight-gradient accumulation through this module where apex's
    extension is absent; returns :func:`kernel_in_use` (None: left unfused). Idempotent."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:  # apex's (Megatron imported it) or this module already
        return kernel_in_use()
    if cuda and not mixed_precision_gemm_available():  # a bf16 step would fall back to an fp32 GEMM
        log.info("weight gradients: torch %s has no mixed-precision addmm; through .grad and DDP's hook",
                 torch.__version__)
        return None
    layers.fused_weight_gradient_mlp_cuda = sys.modules[__name__]
    layers._grad_accum_fusion_available = True
    return kernel_in_use()
