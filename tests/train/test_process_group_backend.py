"""parallel/distributed.py: the default process group can reduce both CUDA and CPU tensors.

The training loop's control collectives (stop flags, metric names, PP bookkeeping) reduce small CPU
tensors; a plain ``"nccl"`` group maps only the ``cuda`` device and raises on them. Checked through
torch's own parsing of the backend string (the GPU run itself needs CUDA).
"""

from __future__ import annotations

from torch.distributed.distributed_c10d import Backend, BackendConfig

from megatron_grm.parallel.distributed import process_group_backend


def _devices(backend: str) -> dict[str, str]:
    return {device: str(name) for device, name in BackendConfig(Backend(backend)).get_device_backend_map().items()}


def test_a_gpu_process_group_reduces_cpu_tensors_over_gloo_and_cuda_tensors_over_nccl():
    assert _devices(process_group_backend(cuda=True)) == {"cpu": "gloo", "cuda": "nccl"}
    assert "cpu" not in _devices("nccl")  # what the loop had before: CPU collectives raised under it


def test_a_cpu_process_group_is_gloo():
    assert _devices(process_group_backend(cuda=False))["cpu"] == "gloo"
