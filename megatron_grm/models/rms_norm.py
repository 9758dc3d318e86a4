"""RMSNorm for Megatron-Core's local spec: torch's ``RMSNorm``, with the C++ passes on the CPU.

Megatron's local spec builds its norms with ``WrappedTorchNorm``, which returns a plain
``torch.nn.RMSNorm``; this subclass takes the same constructor arguments and checks, and runs forward
and backward through ``parallel/elementwise_autograd.py`` where that applies (CPU, fp32 or bf16 input
and weight of one dtype, kernels built), torch's ops elsewhere. Parameters and state dict are
``torch.nn.RMSNorm``'s.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_grm.parallel import elementwise_autograd


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built as Megatron builds its norms (``config, hidden_size, eps``)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "sequence_parallel",
                     "memory_efficient_layer_norm"):
            if getattr(config, flag, False):
                raise ValueError(f"RMSNorm (the local spec's torch norm) does not support config.{flag}=True")
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"RMSNorm built for config.normalization={config.normalization!r}")
        super().__init__(normalized_shape=hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and elementwise_autograd.takes(x, self.weight):
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # torch's default
            return elementwise_autograd.KernelRMSNorm.apply(x, self.weight, eps)
        return super().forward(x)
