"""Process groups, device setup and the one Megatron-on-CPU compatibility layer."""

from megatron_grm.parallel.distributed import (
    ParallelLayout,
    destroy_parallel,
    dist_env,
    init_parallel,
)

__all__ = ["ParallelLayout", "destroy_parallel", "dist_env", "init_parallel"]
