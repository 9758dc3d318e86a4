"""Process groups, device setup and the one Megatron-on-CPU compatibility layer.

Importing this package is cheap: its process-group helpers (and Megatron-Core under them) load at first use,
so ``import megatron_grm`` can install :mod:`megatron_grm.parallel.lazy_compile`'s import hook first."""

from __future__ import annotations

from typing import Any

__all__ = ["ParallelLayout", "destroy_parallel", "dist_env", "init_parallel"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from megatron_grm.parallel import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
