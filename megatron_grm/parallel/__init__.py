"""Process groups, device setup and the one Megatron-on-CPU compatibility layer."""

from megatron_grm.parallel.lazy_compile import import_megatron_core

import_megatron_core()  # before any other import of Megatron-Core: its fused kernels compile on first use

from megatron_grm.parallel.distributed import (  # noqa: E402
    ParallelLayout,
    destroy_parallel,
    dist_env,
    init_parallel,
)

__all__ = ["ParallelLayout", "destroy_parallel", "dist_env", "init_parallel"]
