"""Run Megatron's Adam as one fused kernel when it falls back to torch's optimizer.

Without Transformer Engine or apex (every CPU run, and a GPU install without either), Megatron-Core
builds ``torch.optim.AdamW`` with torch's default multi-tensor (foreach) implementation. torch also has a
fused AdamW kernel for CPU and CUDA (the default of Hugging Face's Trainer since torch 2.8): one pass
per parameter instead of a dozen whole-buffer elementwise ops. On a 168M-parameter fp32 model on this
project's CPU machine it takes 0.16 CPU-s per step against 0.6-0.7 for foreach (docs/performance.md).

The switch is made on the built optimizer, since Megatron constructs the torch optimizer itself, and
again after every ``load_state_dict``: torch restores a checkpoint's saved ``fused``/``foreach`` flags
into the param groups, so a checkpoint written by the foreach path would otherwise switch back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

_ADAM_CLASSES = (torch.optim.Adam, torch.optim.AdamW)


def inner_torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained, mixed-precision, distributed or fp32)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for part in chained for inner in inner_torch_optimizers(part)]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []


def _set_fused(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        group["fused"] = True
        group["foreach"] = False
    opt.defaults["fused"], opt.defaults["foreach"] = True, False


def _fused_supported(opt: torch.optim.Optimizer) -> bool:
    params = [p for group in opt.param_groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) and not any(
        group.get("differentiable") for group in opt.param_groups
    )


def use_fused_adam(optimizer: Any) -> int:
    """Switch every torch Adam/AdamW inside ``optimizer`` to torch's fused kernel; returns how many.

    TE's and apex's FusedAdam (Megatron's choice when installed) are left as they are.
    """
    switched = 0
    for inner in inner_torch_optimizers(optimizer):
        if type(inner) not in _ADAM_CLASSES or not _fused_supported(inner):
            continue
        _set_fused(inner)
        inner.register_load_state_dict_post_hook(_set_fused)
        switched += 1
    if switched:
        log.info("optimizer: torch fused AdamW kernel (%d optimizer(s); no TE/apex FusedAdam)", switched)
    return switched
