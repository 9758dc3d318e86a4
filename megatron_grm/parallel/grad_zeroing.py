"""Zeroing DDP's gradient buffers only where a step's first gradient write adds instead of overwriting.

Megatron's DDP zeroes its whole fp32 ``main_grad`` buffer before every step (``zero_grad_buffer``): one pass
over four bytes per parameter, which ``transformers`` never pays (it drops its ``.grad`` tensors). Most of
that buffer belongs to the weights of Megatron's own linear layers, whose gradient the weight-gradient GEMM
writes in full (parallel/wgrad_gemm.py). :class:`GradZeroing` marks those weights' ``main_grad`` instead, and
the GEMM overwrites a marked one (beta 0) and clears the mark, so later micro-batches add as before. The rest
of the buffer (embedding rows, norms, biases, padding) is zeroed as Megatron does.

A marked weight that got no gradient in the backward (a layer the loss never reached, such as the LM head
under a MetaRM) still holds the last step's gradient: :meth:`GradZeroing.finalize_after` zeroes it before
DDP checks, reduces or clips the buffer.

Only Megatron's own linears running this project's kernel are marked; TE's layers and apex's kernel add into
``main_grad`` whatever it holds, so they keep Megatron's zeroing (as does a buffer shared with parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
    """``zero_grad_buffer`` for a Megatron DDP model that leaves the overwritable weights' gradients to the
    GEMM (``enabled=False``: Megatron's own zeroing)."""

    def __init__(self, ddp: Any, enabled: bool = True) -> None:
        self.ddp = ddp
        shared = getattr(ddp.ddp_config, "reuse_grad_buf_for_mxfp8_param_ag", False)
        candidates = set(overwritable_weights(ddp.module)) if enabled and not shared else set()
        self.weights: list[torch.nn.Parameter] = []
        self.rest: list[torch.Tensor] = []  # views of the buffers that are zeroed as before
        for buffer in ddp.buffers + ddp.expert_parallel_buffers:
            mine = [p for p in buffer.params if p in candidates]
            self.weights += mine
            skipped = [buffer.param_index_map[p][:2] for p in mine]
            self.rest += [buffer.grad_data[a:b] for a, b in _spans_to_zero(buffer.grad_data.numel(), skipped)]
        if self.weights:
            total = sum(b.grad_data.numel() for b in ddp.buffers + ddp.expert_parallel_buffers)
            left = sum(view.numel() for view in self.rest)
            log.info("gradient zeroing: %d weight(s) overwritten by their first weight-gradient GEMM, "
                     "%.1f%% of the buffer zeroed per step (parallel/grad_zeroing.py)", len(self.weights),
                     100.0 * left / max(total, 1))
        else:
            log.info("gradient zeroing: Megatron's, the whole buffer per step")

    def __call__(self) -> None:
        """Prepare every ``main_grad`` for the next step's backward."""
        if not self.weights:
            self.ddp.zero_grad_buffer()
            return
        ddp = self.ddp
        if getattr(ddp.config, "cuda_graph_impl", "none") != "transformer_engine":
            for param in ddp.params_with_grad:  # as zero_grad_buffer does
                param.grad_added_to_main_grad = False
        for view in self.rest:
            view.zero_()
        for weight in self.weights:
            wgrad_gemm.mark_overwrite(weight.main_grad)
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            group.reset()

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
