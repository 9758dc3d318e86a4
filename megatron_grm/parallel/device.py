"""CUDA-vs-CPU decisions, made once: which device, whether TE / apex / FP8 can be used."""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def use_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


@functools.cache
def have_transformer_engine() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # an empty meta-package or a build without CUDA
        log.info("transformer_engine present but unusable (%s)", exc)
        return False
    return True


def use_te_spec() -> bool:
    """The Transformer Engine layer spec needs both TE and a GPU; otherwise the local spec runs."""
    return use_cuda() and have_transformer_engine()


def wgrad_accumulation_fusion_available() -> bool:
    """Whether Megatron's linears can accumulate weight gradients inside the GEMM: apex's
    ``fused_weight_gradient_mlp_cuda`` where installed (NGC images), else
    :mod:`megatron_grm.parallel.wgrad_gemm` (installed by ``init_parallel``; TE layers fuse on their own)."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def compute_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if use_cuda() else None


def log_backend_choice() -> str:
    """One log line that says which code path this process runs (TE or local spec, device)."""
    if use_te_spec():
        import transformer_engine

        line = f"CUDA {torch.cuda.get_device_name()} — Transformer Engine {transformer_engine.__version__} spec"
    elif use_cuda():
        line = f"CUDA {torch.cuda.get_device_name()} — Transformer Engine absent, Megatron-Core local spec"
    else:
        line = "CPU — Megatron-Core local spec (Transformer Engine, apex, FP8 and the dynamic engine unused)"
    log.info("compute path: %s", line)
    return line


def to_device(batch: dict) -> dict:
    """A micro-batch's tensors on this process's device (the producers collate on the host; Megatron's
    schedules pass batches to the model as they are). A no-op on CPU."""
    target = device()
    return {k: v.to(target, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
