"""A step whose gradient norm is not finite is skipped, never applied.

Megatron-Core checks gradients for inf/NaN only through a grad scaler (fp16, or a set ``loss_scale``).
With bf16 or fp32 and no scaler, a NaN gradient norm makes the clipping coefficient NaN, ``NaN < 1`` is
False, nothing is clipped, and the optimizer writes NaN into every weight while the loss (computed before
backward) still looked finite. Every Megatron optimizer computes the global norm (all-reduced over the
model-parallel ranks, so all ranks agree) through ``get_grad_norm`` or ``clip_grad_norm`` before
``step_with_ready_grads``; the guard remembers that norm and refuses the update when it is not finite,
which Megatron's ``step`` then reports as an unsuccessful update.
"""

from __future__ import annotations

import math
from typing import Any


def skip_nonfinite_updates(optimizer: Any) -> Any:
    """Guard ``optimizer`` (a Megatron optimizer, chained or not) in place; returns it."""
    seen: list[float | None] = [None]
    get_norm, clip_norm, apply = optimizer.get_grad_norm, optimizer.clip_grad_norm, optimizer.step_with_ready_grads

    def get_grad_norm(*args: Any, **kwargs: Any):
        norm = get_norm(*args, **kwargs)
        seen[0] = float(norm)
        return norm

    def clip_grad_norm(*args: Any, **kwargs: Any):
        norm = clip_norm(*args, **kwargs)
        seen[0] = float(norm)
        return norm

    def step_with_ready_grads(*args: Any, **kwargs: Any) -> bool:
        norm, seen[0] = seen[0], None
        if norm is not None and not math.isfinite(norm):
            return False
        return apply(*args, **kwargs)

    optimizer.get_grad_norm = get_grad_norm
    optimizer.clip_grad_norm = clip_grad_norm
    optimizer.step_with_ready_grads = step_with_ready_grads
    return optimizer
