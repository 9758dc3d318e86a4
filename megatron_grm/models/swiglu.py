"""SwiGLU as one autograd function, the local spec's MLP activation on CPU.

Without the fused kernel (CUDA: Megatron's ``bias_swiglu_impl``), Megatron-Core's MLP splits fc1's
``[s, b, 2·ffn]`` output with ``torch.chunk`` and lets autograd differentiate ``silu(gate) * up``: the
elementwise ops read strided halves, and backward ends in a ``cat`` that copies both ffn-sized gradients
into fc1's. Here backward writes the two halves of fc1's gradient in place (same math, same saved
tensors: fc1's output and ``silu(gate)``). Measured on this project's 2-core CPU at ``[1024, 2, 2·2816]``
fp32: 13 ms vs 32-45 ms per layer for forward + backward, bit-identical results.

Where the C++ passes are built (CPU, fp32 or bf16), :func:`swiglu` runs them instead, forward and backward
(``parallel/elementwise_autograd.py``: one pass each way, and only fc1's output kept for the backward).

Megatron builds an MLP's activation from the layer spec (``MLPSubmodules.activation_func``) when
``config.use_te_activation_func`` is set; the module then receives fc1's whole output, as TE's does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_grm.parallel import elementwise_autograd


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(x, act)
        return act * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, act = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :f]) * x[..., f:]`` for ``x`` of last dimension ``2f``: the C++ passes on the CPU where
    they apply (``parallel/elementwise_autograd.py``), torch's ops otherwise."""
    if elementwise_autograd.takes(x):
        return elementwise_autograd.KernelSwiGLU.apply(x)
    return _SwiGLU.apply(x)


class SwiGLU(torch.nn.Module):
    """The MLP activation module Megatron builds from the spec (it passes the config; nothing to keep)."""

    def __init__(self, config: Any = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Megatron's MLP asks each child for its checkpoint shards: this one has no state."""
        return {}
