"""Numeric precision of parameters and compute, validated against the hardware it will run on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP8_RECIPES = (None, "hybrid", "e4m3")
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada / Hopper and newer


@dataclass(frozen=True)
class PrecisionConfig:
    params_dtype: str = "fp32"
    fp8: str | None = None

    def __post_init__(self) -> None:
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
