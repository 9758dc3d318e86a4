"""RMSNorm, SwiGLU and RoPE for CPU training: the C++ passes (``csrc/elementwise.cpp``) forward and backward.

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

RoPE: Megatron's ``_apply_rotary_pos_emb_bshd`` computes cos and sin of the whole angle table in every call
(each layer's queries and keys), rotates half the channels through a ``cat`` and ends in another ``cat``, and
autograd differentiates all of it: the queries' forward and backward took 7.5 ms a layer at the RFT shape on
that Xeon, 2.0 with the kernel. :func:`install_rope` puts :class:`KernelRoPE` in its place on the CPU: the
rotation in one pass, the backward the rotation by the opposite angle, cos and sin once per angle table. The
same products and sums as Megatron's ops, so its results are Megatron's to the bit (the kernel rounds each
product before the sum, as torch does); anything else (another dtype or device, multi-latent attention, an
angle table whose two halves differ) keeps Megatron's function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from megatron_grm.parallel import cpu_decode_kernel

log = logging.getLogger(__name__)


# Off: torch's and Megatron's ops everywhere (``trainer.cpu_elementwise_kernels``; the Trainer sets it).
_enabled = True


def enable(on: bool, device: torch.device | None = None) -> None:
    """Switch the passes on or off for this process (``trainer.cpu_elementwise_kernels``): off, a run takes
    the round-off path of torch's ops, e.g. to reproduce a run trained before they existed. On a CPU
    ``device`` it logs which path the training ops take (and why, where the kernels cannot be built)."""
    global _enabled
    _enabled = on
    if device is not None and device.type == "cpu":
        if not on:
            path = "torch's and Megatron's ops (trainer.cpu_elementwise_kernels=false)"
        elif cpu_decode_kernel.available(torch.float32):
            path = "C++ passes forward and backward (parallel/elementwise_autograd.py)"
        else:
            path = f"torch's and Megatron's ops (no C++ kernels: {cpu_decode_kernel.unavailable_reason()})"
        log.info("RMSNorm, SwiGLU and RoPE in training: %s", path)


def takes(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the C++ passes run for input ``x`` (and a norm's ``weight``): switched on, on the CPU, fp32 or
    bf16, the weight of ``x``'s dtype, the library built here."""
    return (_enabled and x.device.type == "cpu" and x.dtype in cpu_decode_kernel.ELEMENTWISE_DTYPES
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


class KernelRoPE(torch.autograd.Function):
    """RoPE of Megatron's ``[s, b, heads, d]`` tensor by ``cos``/``sin`` ``[1, s, 1, half]`` (its dtype): the
    first ``2 * half`` channels of each head rotated, the rest passed through; the backward rotates the
    gradient back (``sin`` negated: a rotation's transpose)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, minus_sin: torch.Tensor,
                interleaved: bool) -> torch.Tensor:
        ctx.save_for_backward(cos, minus_sin)
        ctx.interleaved = interleaved
        return cpu_decode_kernel.rotary(t.transpose(0, 1), cos, sin, interleaved).transpose(0, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        cos, minus_sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        back = cpu_decode_kernel.rotary(grad.transpose(0, 1), cos, minus_sin, ctx.interleaved).transpose(0, 1)
        return back, None, None, None, None


# The last angle table's key and cos/sin/-sin: every layer's queries and keys in one forward share Megatron's
# table. The key holds whether inference mode was on: Megatron caches its RoPE table per length, so a training
# step can meet the table a forward under ``torch.inference_mode()`` used (Megatron's inference engine runs
# so; the stages' CPU rollouts take their own RoPE), and cos/sin made there cannot be saved for a backward.
_last_angles: tuple[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def _angles(freqs: torch.Tensor, dtype: torch.dtype, mscale: float,
            interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """cos, sin and -sin ``[1, s, 1, half]`` for Megatron's angle table ``freqs`` ``[s, 1, 1, 2 half]`` as its
    bshd path computes them (``(cos(freqs) * mscale).to(dtype)``), where the table repeats each angle for the
    two channels it rotates (halves, or neighbours when interleaved); None otherwise."""
    global _last_angles
    key = (-1 if freqs.is_inference() else freqs._version, dtype, mscale, interleaved,
           torch.is_inference_mode_enabled())
    last = _last_angles
    if last is not None and last[0][0] is freqs and last[0][1:] == key:
        return last[1]
    s, rot = freqs.shape[0], freqs.shape[-1]
    if interleaved:
        first, second = freqs[..., 0::2], freqs[..., 1::2]
    else:
        first, second = freqs[..., :rot // 2], freqs[..., rot // 2:]
    if not torch.equal(first, second):
        return None
    angles = first.reshape(1, s, 1, rot // 2)
    cos, sin = (torch.cos(angles) * mscale).to(dtype), (torch.sin(angles) * mscale).to(dtype)
    tables = (cos, sin, -sin)
    _last_angles = ((freqs, *key), tables)
    return tables


def _kernel_rope(megatrons: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def apply(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
              multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
        if (not multi_latent_attention and takes(t) and t.dim() == 4 and t.stride(-1) == 1 and freqs.dim() == 4
                and freqs.shape[0] == t.shape[0] and freqs.shape[1] == freqs.shape[2] == 1
                and freqs.shape[-1] % 2 == 0 and 0 < freqs.shape[-1] <= t.shape[-1] and not freqs.requires_grad
                and freqs.device.type == "cpu"):
            angles = _angles(freqs, t.dtype, mscale, rotary_interleaved)
            if angles is not None:
                return KernelRoPE.apply(t, *angles, rotary_interleaved)
        return megatrons(t, freqs, rotary_interleaved, multi_latent_attention, mscale)

    apply.megatrons = megatrons
    return apply


def install_rope(cuda: bool) -> bool:
    """On the CPU, make Megatron's bshd RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) take
    :class:`KernelRoPE` where it applies; returns whether it does. Idempotent; logs when it installs."""
    import megatron.core.models.common.embeddings.rope_utils as rope_utils

    if cuda or not cpu_decode_kernel.available(torch.float32):
        return False
    if not hasattr(rope_utils._apply_rotary_pos_emb_bshd, "megatrons"):
        rope_utils._apply_rotary_pos_emb_bshd = _kernel_rope(rope_utils._apply_rotary_pos_emb_bshd)
        log.debug("Megatron's bshd RoPE wrapped: the C++ pass where the passes are switched on")
    return True
