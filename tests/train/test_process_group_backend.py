"""parallel/distributed.py: the default process group can reduce both CUDA and CPU tensors, and a lone
process rendezvous on a free port.

The training loop's control collectives (stop flags, metric names, PP bookkeeping) reduce small CPU
tensors; a plain ``"nccl"`` group maps only the ``cuda`` device and raises on them. Checked through
torch's own parsing of the backend string (the GPU run itself needs CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from torch.distributed.distributed_c10d import Backend, BackendConfig

from megatron_grm.parallel.distributed import process_group_backend
from tests.conftest import REPO, REPO_PYTHONPATH


def _devices(backend: str) -> dict[str, str]:
    return {device: str(name) for device, name in BackendConfig(Backend(backend)).get_device_backend_map().items()}


def test_a_gpu_process_group_reduces_cpu_tensors_over_gloo_and_cuda_tensors_over_nccl():
    assert _devices(process_group_backend(cuda=True)) == {"cpu": "gloo", "cuda": "nccl"}
    assert "cpu" not in _devices("nccl")  # what the loop had before: CPU collectives raised under it


def test_a_cpu_process_group_is_gloo():
    assert _devices(process_group_backend(cuda=False))["cpu"] == "gloo"


_LONE_PROCESS = """
import json, os, socket, sys
from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel

# Another run on this node holds the port a fixed default would pick.
held = socket.socket()
held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    held.bind(("127.0.0.1", 29500))
    held.listen()
except OSError:  # something else already holds it: the same situation
    pass
init_parallel(ParallelLayout())
import torch
t = torch.ones(1)
torch.distributed.all_reduce(t)
print(json.dumps({"port": os.environ["MASTER_PORT"], "world": torch.distributed.get_world_size(), "sum": t.item()}))
destroy_parallel()
"""


def test_a_lone_process_without_a_launcher_rendezvous_on_a_free_port():
    """``python -m megatron_grm.stages.evaluate ...`` or a tool started plainly: a one-process group on a port
    nobody holds, so a second such run on the node (or anything on 29500) does not collide with it."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = REPO_PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", _LONE_PROCESS], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world"] == 1 and result["sum"] == 1.0
    assert int(result["port"]) != 29500


def test_metrics_reduce_to_their_mean_or_max_over_ranks(tmp_path):
    """GRPO's rollout throughput is every replica's tokens over the slowest rank's seconds (it was the mean
    of per-rank rates, unlike train/tokens_per_s), and its log-prob check reports the worst rank."""
    from pathlib import Path

    from tests.conftest import read_json, torchrun

    torchrun(Path(__file__).parent / "scripts" / "rank_reductions.py", 2, [str(tmp_path / "out.json")])
    result = read_json(tmp_path / "out.json")
    assert result == {"mean": {"seconds": 3.5, "tokens": 200.0}, "max": {"seconds": 5.0, "tokens": 300.0}}
