"""Run Megatron-Core on a machine without CUDA: the one place where we adapt it.

Megatron-Core 0.16.1 assumes CUDA in a handful of places that have nothing to do with the math
(device arguments, streams, the model-parallel RNG tracker, type-name asserts). Everything here is a
faithful CPU stand-in for those spots, so the real GPTModel, DDP, optimizer, pipeline schedules,
dist_checkpointing and inference engine run unchanged over gloo. Pinned to the version below; the
patches are applied only when CUDA is absent, once per process, by :func:`apply_cpu_compat`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

PINNED_MEGATRON_CORE = "0.16.1"
_APPLIED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):  # a bare ordinal means a CUDA device in torch's factories
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` / ``torch.cuda.current_device()`` / ``.cuda()`` to the CPU.

    Adapts e.g. ``torch.zeros([], device="cuda")`` in pipeline_parallel/schedules.py (token counts),
    ``torch.tensor([...], device='cuda')`` in optimizer/optimizer.py and optimizer/clip_grads.py,
    ``torch.triu(torch.ones(sq, sq, device="cuda"))`` in transformer/utils.py (default causal mask),
    ``device=torch.cuda.current_device()`` in p2p_communication.py, param_and_grad_buffer.py and
    rotary_pos_embedding.py, and ``tokens.cuda()`` in the text generation controller.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stand-in for torch.cuda.Stream/Event: on the CPU every op is already synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None

    def query(self) -> bool:
        return True


class _CpuTimingEvent(_NoOpStream):
    """Stand-in for torch.cuda.Event(enable_timing=True) that really measures time on the CPU.

    Added for the rollout engine: inference/text_generation_controllers/text_generation_controller.py
    (generate_all_output_tokens_static_batch, 0.16.1) records an event per decoding step and divides
    ``elapsed_time`` by 1e3 to get per-token latencies; a no-op event returns None there and the
    static-batch generation fails with a TypeError.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t: float | None = None

    def record(self, *args: Any, **kwargs: Any) -> None:
        self._t = time.perf_counter()

    def elapsed_time(self, end: _CpuTimingEvent) -> float:
        """Milliseconds between this event and ``end``, as torch.cuda.Event.elapsed_time returns."""
        if self._t is None or end._t is None:
            return 0.0
        return (end._t - self._t) * 1e3


def _cpu_rng_get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


_real_tensor_type = torch.Tensor.type


def _type_reporting_cuda(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
    """optimizer/optimizer.py and clip_grads.py assert ``param.type() == 'torch.cuda.FloatTensor'``."""
    if dtype is None and not kwargs:
        name = _real_tensor_type(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
    return _real_tensor_type(self, dtype, non_blocking, **kwargs)


def without_cpu_compat() -> contextlib.AbstractContextManager:
    """Run a block with the process-global torch-function mode off: a ``transformers`` model timed next to
    ours in one process (in a process of its own it would not pay for the mode), and the rollout's waves.

    Megatron's static generation loop and the model's inference forward create no tensor on a ``"cuda"``
    device (their ``.cuda()`` and ``torch.cuda.current_device()`` are patched directly above), and they make
    ~770 torch calls per decode step of the 21M bench model, each paying the mode's ~1.4 µs dispatch.
    """
    return torch._C.DisableTorchFunction() if not torch.cuda.is_available() else contextlib.nullcontext()


def apply_cpu_compat() -> bool:
    """Apply the CPU adaptations once; returns True when they are active in this process.

    A no-op when CUDA is available: on a GPU Megatron-Core runs exactly as shipped.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False

    import megatron.core
    from megatron.core.tensor_parallel import random as mcore_random

    if megatron.core.__version__ != PINNED_MEGATRON_CORE:
        log.warning(
            "cpu_compat is written for megatron-core %s, found %s", PINNED_MEGATRON_CORE, megatron.core.__version__
        )

    # Device arguments and .cuda() calls (see _CudaToCpuMode for the call sites).
    _CudaToCpuMode().__enter__()
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 0  # type: ignore[assignment]

    # Streams/events: param_and_grad_buffer.py (communication stream), p2p_communication.py and
    # dist_checkpointing (torch.cuda.synchronize), inference engines (events for timing).
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.Stream = _NoOpStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NoOpStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]

    # tensor_parallel/random.py: the model-parallel RNG tracker keeps "CUDA" generator states and
    # model_parallel_cuda_manual_seed seeds them; back both by the CPU generator.
    mcore_random._get_cuda_rng_state = _cpu_rng_get_state
    mcore_random._set_cuda_rng_state = _cpu_rng_set_state
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    # The tracker logs a warning whenever the (shared) CPU generator moves inside a fork; on CPU the
    # two generators are one, so that warning is expected and only noise.
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)
    # Megatron reads ``.grad`` of non-leaf tensors in a few places; through the mode above torch warns.
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")

    # optimizer/optimizer.py, optimizer/clip_grads.py: asserts on the CUDA tensor type name.
    torch.Tensor.type = _type_reporting_cuda  # type: ignore[method-assign]

    # models/gpt/gpt_model.py pins the attention backend through NVTE_* variables and asserts they
    # are unchanged on the next model; the local spec ignores them, so start each process clean.
    for var in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        os.environ.pop(var, None)

    # Rollout engine (added): timing events that measure, see _CpuTimingEvent.
    torch.cuda.Event = _CpuTimingEvent  # type: ignore[assignment,misc]

    _APPLIED = True
    log.info("megatron-core %s: CUDA absent, CPU compatibility layer active", megatron.core.__version__)
    return True
