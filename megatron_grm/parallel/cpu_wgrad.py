"""Weight-gradient accumulation fused into the GEMM on CPU: apex's ``fused_weight_gradient_mlp_cuda``
contract, which Megatron-Core's linear layers call when ``gradient_accumulation_fusion`` is on.

Without it, every linear's backward writes a fresh ``weight.grad`` and Megatron's DDP hook then adds it
into the bucket's ``main_grad``: one more pass over every weight per micro-batch, and a weight-sized
allocation to fault in. With it the weight-gradient GEMM accumulates straight into ``main_grad``
(``addmm_`` with beta 1, inside the BLAS call), as the CUDA kernel does on a GPU.
"""

from __future__ import annotations

import torch


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` (2-D operands, as Megatron passes them)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32  # bf16/fp16 main_grad buffers: the same call on CPU
