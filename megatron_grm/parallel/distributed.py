"""torch.distributed + Megatron-Core parallel state from torchrun or Slurm environment variables.

gloo without CUDA, nccl with it. Every stage calls :func:`init_parallel` once at start-up and
:func:`destroy_parallel` at exit; nothing else in the package touches process groups directly.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """How the world is split: TP × CP × PP × DP (DP is what is left over)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def dist_env() -> DistEnv:
    """Rank/world from torchrun (RANK, LOCAL_RANK, WORLD_SIZE) or from Slurm (SLURM_PROCID, ...).

    torchrun's variables win when both are present: a Slurm job that launches torchrun per node sees
    both, and torchrun's are the per-process truth.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env.get("MASTER_PORT", "29500"))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, master_addr=addr, master_port=port)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker (TP ranks differ)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_group_backend(cuda: bool) -> str:
    """NCCL for CUDA tensors and, on a GPU cluster too, gloo for CPU ones: the loop's control collectives
    (stop flags, metric names, checkpoint bookkeeping) reduce small CPU tensors, which NCCL cannot."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def local_device_index(local_rank: int, visible_devices: int) -> int:
    """This task's GPU among the ones it sees. With every GPU of the node visible (one task per GPU, the
    scripts' default) that is the local rank; where the site binds one GPU per task (``--gpus-per-task=1``,
    ``--gpu-bind=single:1``) each task sees only its own, as device 0."""
    if visible_devices < 1:
        raise RuntimeError("CUDA is available but no device is visible")
    return local_rank % visible_devices


def init_parallel(layout: ParallelLayout, seed: int = 1234, timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed and Megatron-Core's TP/PP/CP/DP groups; idempotent per process."""
    from megatron.core import parallel_state

    from megatron_grm.parallel.device import use_cuda
    from megatron_grm.parallel.mkl_vml import resolve_vml_dispatch

    resolve_vml_dispatch()  # before any multi-threaded cos/exp/sqrt: pytorch/pytorch#188792
    env = dist_env()
    cuda = use_cuda()
    if not cuda:
        from megatron_grm.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    from megatron_grm.parallel import (
        elementwise_autograd,
        host_memory,
        multi_tensor,
        onednn_training,
        torch_adam_resume,
        wgrad_gemm,
    )

    torch_adam_resume.install()
    host_memory.keep_freed_host_memory(cuda)
    multi_tensor.install()
    wgrad_gemm.install(cuda)
    onednn_training.install(cuda)
    elementwise_autograd.install_rope(cuda)
    if env.world_size % layout.model_parallel != 0:
        raise ValueError(
            f"world size {env.world_size} is not divisible by TP*CP*PP = {layout.tensor_parallel}*"
            f"{layout.context_parallel}*{layout.pipeline_parallel}"
        )
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(local_device_index(env.local_rank, torch.cuda.device_count()))
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        if env.world_size == 1 and "MASTER_PORT" not in os.environ:
            # A lone process started without a launcher (a tool, `python -m megatron_grm.stages.evaluate`) has
            # no peer to agree with; a fixed default port would collide with the next such run on this node.
            os.environ["MASTER_PORT"] = str(free_port())
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        torch.distributed.init_process_group(
            backend=process_group_backend(cuda),
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            context_parallel_size=layout.context_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_everything(seed)
    log.info(
        "rank %d/%d: TP=%d PP=%d CP=%d DP=%d backend=%s",
        env.rank, env.world_size, layout.tensor_parallel, layout.pipeline_parallel,
        layout.context_parallel, layout.data_parallel(env.world_size), "nccl" if cuda else "gloo",
    )
    return env


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def true_on_any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a stop request one rank's handler saw): every rank then takes
    the same branch, so none is left waiting in a collective the others skipped."""
    value = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over all ranks (TP/PP peers of a DP rank repeat its value, which the mean keeps)."""
    return _reduce_over_ranks(values, torch.distributed.ReduceOp.SUM, average=True)


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's maximum over all ranks (the slowest rank's time, the worst rank's error)."""
    return _reduce_over_ranks(values, torch.distributed.ReduceOp.MAX, average=False)


def _reduce_over_ranks(values: dict[str, float], op, average: bool) -> dict[str, float]:
    if not torch.distributed.is_initialized():
        return dict(values)
    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64)  # host tensor: the default group has gloo
    torch.distributed.all_reduce(t, op=op)
    if average:
        t /= torch.distributed.get_world_size()
    return dict(zip(names, t.tolist()))


def data_parallel_rank_and_size() -> tuple[int, int]:
    """This process's data-parallel rank and the group's size; (0, 1) without torch.distributed."""
    if not torch.distributed.is_initialized():
        return 0, 1
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def sum_over_data_parallel(*tensors: torch.Tensor) -> None:
    """In place: each tensor becomes its sum over the data-parallel group (tensor/pipeline peers hold
    the same values, so they are not counted twice)."""
    if not torch.distributed.is_initialized():
        return
    from megatron.core import parallel_state

    for t in tensors:
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
