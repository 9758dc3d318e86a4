"""Numeric precision of parameters and compute, validated against the hardware it will run on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP8_RECIPES = (None, "hybrid", "e4m3")
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada / Hopper and newer


FP8_AMAX_ALGOS = ("most_recent", "max")


@dataclass(frozen=True)
class PrecisionConfig:
    """``fp8``: "hybrid" (E4M3 forward, E5M2 gradients, delayed scaling) or "e4m3" (per-tensor current
    scaling). The ``fp8_*`` knobs tune delayed scaling (defaults: Megatron-Core's; conf/precision/fp8.yaml
    sets Transformer Engine's own, a 1024-step amax history reduced by max) and are ignored by current
    scaling."""

    params_dtype: str = "fp32"
    fp8: str | None = None
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"

    def __post_init__(self) -> None:
        if self.fp8_amax_compute_algo not in FP8_AMAX_ALGOS:
            raise ValueError(f"precision.fp8_amax_compute_algo={self.fp8_amax_compute_algo!r}; choose one of "
                             f"{FP8_AMAX_ALGOS}")
        if self.fp8_amax_history_len < 1 or self.fp8_margin < 0:
            raise ValueError("precision.fp8_amax_history_len must be >= 1 and precision.fp8_margin >= 0")
        if self.params_dtype not in PARAM_DTYPES:
            raise ValueError(f"precision.params_dtype={self.params_dtype!r}; choose one of {list(PARAM_DTYPES)}")
        if self.fp8 not in FP8_RECIPES:
            raise ValueError(f"precision.fp8={self.fp8!r}; choose one of {FP8_RECIPES}")
        if self.fp8 is not None and self.params_dtype != "bf16":
            raise ValueError("precision.fp8 needs precision.params_dtype=bf16 (FP8 GEMMs keep bf16 master copies)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return PARAM_DTYPES[self.params_dtype]

    def check_hardware(self, compute_capability: tuple[int, int] | None, gpu_name: str = "this device") -> None:
        """FP8 needs compute capability ≥ 8.9: an A100 (8.0) asking for it is a config error, not a crash."""
        if self.fp8 is None:
            return
        if compute_capability is None:
            raise ValueError(
                f"precision.fp8={self.fp8!r} needs a GPU with compute capability >= 8.9; {gpu_name} has none"
            )
        if tuple(compute_capability) < FP8_MIN_COMPUTE_CAPABILITY:
            cc = ".".join(map(str, compute_capability))
            raise ValueError(
                f"precision.fp8={self.fp8!r} needs compute capability >= 8.9 (Hopper/Ada); "
                f"{gpu_name} has {cc}. Use precision=bf16."
            )


@contextlib.contextmanager
def fp8_suspended(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` without FP8 GEMMs while the block runs (bf16 on the TE layers' own weights).

    Rollouts decode a few rows per step, and Transformer Engine executes a GEMM in FP8 only when the rows
    are a multiple of 8 (16 for some recipes): a decode step of 3 rows, or a prefill of odd length, would
    assert. Megatron enters FP8 per forward from ``config.fp8``, so clearing it on every config object of
    the model turns FP8 off for these forwards and leaves training's amax history untouched.
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "fp8", None) is not None}
    saved = {key: c.fp8 for key, c in configs.items()}
    for c in configs.values():
        c.fp8 = None
    try:
        yield
    finally:
        for key, c in configs.items():
            c.fp8 = saved[key]
