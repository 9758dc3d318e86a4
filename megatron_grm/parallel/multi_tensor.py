"""The optimizer's multi-tensor ops (gradient norm, gradient clipping, main-to-model copies) without apex/TE.

Megatron-Core's optimizer and gradient clipping call apex's or TE's fused ``multi_tensor_l2norm`` and
``multi_tensor_scale``. Without either (a pip-installed GPU machine, or any CPU), it falls back to
per-tensor Python loops (``megatron.core.utils.local_multi_tensor_*``): a temporary per tensor for every
scale, and a gradient norm that reads each tensor's norm back to the host one by one (a device sync per
parameter on a GPU). :func:`install` swaps in the same contracts on ``torch._foreach_*`` ops: one
multi-tensor launch per op on a GPU, no host reads, and results bit-identical to the fallbacks on CPU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def multi_tensor_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                       scale: float) -> None:
    """apex's ``multi_tensor_scale``: ``dst = src * scale`` for each pair, written into ``dst``'s storage
    (``src`` may be ``dst``; ``dst`` may have a narrower dtype: one rounding, as apex)."""
    src, dst = tensor_lists
    if not dst:
        return
    if scale == 1.0:  # the main-to-model parameter copy
        torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):  # gradient clipping scales the gradients in place
        torch._foreach_mul_(dst, scale)
    else:
        for s, d in zip(src, dst):
            torch.mul(s, scale, out=d)


def multi_tensor_l2norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                        per_tensor: bool, *args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """apex's ``multi_tensor_l2norm``: the L2 norm of all tensors together as a 1-element fp32 tensor on
    their device (and each tensor's norm when ``per_tensor``), computed without reading back to the host."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors, 2)])
    total = torch.linalg.vector_norm(norms).reshape(1)
    return total, (norms if per_tensor else None)


def install() -> list[str]:
    """Replace Megatron-Core's local fallbacks (only those: apex's and TE's kernels stay) in its optimizer
    and gradient clipping; returns what was replaced. Idempotent."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    replaced = []
    for module in (clip_grads, mcore_optimizer):
        if module.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = multi_tensor_scale
            replaced.append(f"{module.__name__}.multi_tensor_scale_impl")
    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2norm
        replaced.append(f"{clip_grads.__name__}.l2_norm_impl")
    if replaced:
        log.info("optimizer multi-tensor ops: apex/TE absent, torch foreach ops instead of Megatron's per-tensor "
                 "fallbacks (%s)", ", ".join(replaced))
    return replaced
