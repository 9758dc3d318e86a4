"""Zeroing DDP's gradient buffers only where a step's first gradient write adds instead of overwriting.

Megatron's DDP zeroes its whole fp32 ``main_grad`` buffer before every step (``zero_grad_buffer``): one pass
over four bytes per parameter, which ``transformers`` never pays (it drops its ``.grad`` tensors). Most of
that buffer belongs to the weights of Megatron's own linear layers, whose gradient the weight-gradient GEMM
writes in full (parallel/wgrad_gemm.py). :class:`GradZeroing` has each buffer's reset (what DDP's own
``zero_grad_buffer`` calls) mark those weights' ``main_grad`` instead; the GEMM overwrites a marked one
(beta 0) and clears the mark, so later micro-batches add as before. The rest of the buffer (embedding rows,
norms, biases, padding) is zeroed as Megatron does.

A marked weight that got no gradient in the backward (a layer the loss never reached, such as the LM head
under a MetaRM) still holds the last step's gradient: :meth:`GradZeroing.finalize_after` zeroes it before
DDP checks, reduces or clips the buffer.

Only Megatron's own linears running this project's kernel are marked; TE's layers and apex's kernel add into
``main_grad`` whatever it holds, so they keep Megatron's zeroing (as does a buffer shared with parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from megatron_grm.parallel import wgrad_gemm

log = logging.getLogger(__name__)


def overwritable_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights whose whole gradient one GEMM of this project's kernel writes: Megatron's column/row
    parallel linears, running Megatron's own forward, with gradient accumulation fusion on."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if not wgrad_gemm.kernel_in_use().startswith("torch"):
        return []
    weights = []
    for layer in module.modules():
        megatrons = next((cls for cls in (ColumnParallelLinear, RowParallelLinear) if isinstance(layer, cls)), None)
        if megatrons is None or type(layer).forward is not megatrons.forward:
            continue
        weight = getattr(layer, "weight", None)  # None: an output layer tied to the embedding
        if layer.gradient_accumulation_fusion and weight is not None and weight.requires_grad:
            weights.append(weight)
    return weights


def _spans_to_zero(size: int, skipped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[0, size)`` without the ``skipped`` ``(start, end)`` spans, as sorted spans."""
    spans, cursor = [], 0
    for start, end in sorted(skipped):
        if start > cursor:
            spans.append((cursor, start))
        cursor = max(cursor, end)
    if cursor < size:
        spans.append((cursor, size))
    return spans


class GradZeroing:
    """Makes each of a Megatron DDP model's gradient buffers, when ``zero_grad_buffer`` resets it, zero only
    what no GEMM overwrites and mark the weights a GEMM does (``enabled=False``: Megatron's reset)."""

    def __init__(self, ddp: Any, enabled: bool = True) -> None:
        shared = getattr(ddp.ddp_config, "reuse_grad_buf_for_mxfp8_param_ag", False)
        candidates = set(overwritable_weights(ddp.module)) if enabled and not shared else set()
        self.weights: list[torch.nn.Parameter] = []
        buffers = ddp.buffers + ddp.expert_parallel_buffers
        for buffer in buffers:
            mine = [p for p in buffer.params if p in candidates]
            if not mine:
                continue
            spans = _spans_to_zero(buffer.grad_data.numel(), [buffer.param_index_map[p][:2] for p in mine])
            buffer.reset = partial(self._reset, [buffer.grad_data[a:b] for a, b in spans], mine)
            self.weights += mine
        total = sum(b.grad_data.numel() for b in buffers)
        self.zeroed_fraction = 1.0 - sum(w.numel() for w in self.weights) / max(total, 1)
        if self.weights:
            log.info("gradient zeroing: %d weight(s) overwritten by their first weight-gradient GEMM, "
                     "%.1f%% of the buffer zeroed per step (parallel/grad_zeroing.py)", len(self.weights),
                     100.0 * self.zeroed_fraction)
        else:
            log.info("gradient zeroing: Megatron's, the whole buffer per step")

    @staticmethod
    def _reset(rest: list[torch.Tensor], weights: list[torch.nn.Parameter]) -> None:
        """A buffer's reset: zero the views no GEMM overwrites, mark the weights one does."""
        for view in rest:
            view.zero_()
        for weight in weights:
            wgrad_gemm.mark_overwrite(weight.main_grad)

    def zero_unwritten(self) -> int:
        """Zero the marked gradients no GEMM wrote in this backward; returns how many there were."""
        unwritten = [w.main_grad for w in self.weights if wgrad_gemm.take_overwrite(w.main_grad)]
        for grad in unwritten:
            grad.zero_()
        return len(unwritten)

    def finalize_after(self, finalize: Callable[..., Any]) -> Callable[..., Any]:
        """``finalize`` (Megatron's ``finalize_model_grads``), run once the unwritten gradients are zeroed."""

        def finalize_model_grads(*args: Any, **kwargs: Any) -> Any:
            self.zero_unwritten()
            return finalize(*args, **kwargs)

        return finalize_model_grads
