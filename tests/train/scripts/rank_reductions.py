"""Two ranks (torchrun): parallel/distributed.py's mean_over_ranks and max_over_ranks over gloo; rank 0
writes the results as JSON to the path given."""

from __future__ import annotations

import json
import sys

import torch

from megatron_grm.parallel import ParallelLayout, destroy_parallel, init_parallel
from megatron_grm.parallel.distributed import max_over_ranks, mean_over_ranks

if __name__ == "__main__":
    init_parallel(ParallelLayout(), seed=0)
    rank = torch.distributed.get_rank()
    values = {"seconds": [2.0, 5.0][rank], "tokens": [100.0, 300.0][rank]}
    result = {"mean": mean_over_ranks(values), "max": max_over_ranks(values)}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    destroy_parallel()
