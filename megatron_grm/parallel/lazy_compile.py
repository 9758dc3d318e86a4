"""Import Megatron-Core without paying for TorchDynamo in every process.

Megatron-Core decorates its fused kernels (bias-GeLU, SwiGLU, RoPE, ...) with ``torch.compile`` when its
modules are imported. Building those wrappers imports TorchDynamo and Inductor: 1.5-1.6 s of CPU in each
process (Megatron-Core's import, 2.7-2.9 s against 1.1-1.3 s without it, on this 2-core machine). The suite
and the demo start many torchrun ranks and tool processes, and most never call a fused kernel (on CPU
none is called). :func:`import_megatron_core` imports Megatron-Core while ``torch.compile`` returns lazy
wrappers, so a decorated function is compiled by the real ``torch.compile``, with the same arguments, at
its first call. Nothing else changes: compiling happened at the first call before too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


def lazy_compile(real: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for ``torch.compile`` (``real``) that defers the compile to the first call."""

    def compile_later(model: Callable[..., Any] | None = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile_later(fn, **options)
        compiled: Callable[..., Any] | None = None

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    return compile_later


@contextlib.contextmanager
def compile_deferred() -> Iterator[None]:
    """``torch.compile`` defers compiling (and importing TorchDynamo) inside the block."""
    real = torch.compile
    torch.compile = lazy_compile(real)
    try:
        yield
    finally:
        torch.compile = real


def import_megatron_core() -> None:
    """Import Megatron-Core with its fused kernels compiled lazily; a no-op once it is imported, or where it
    is not installed (the parts that need it then fail on their own import, naming it)."""
    if "megatron.core" in sys.modules or importlib.util.find_spec("megatron") is None:
        return
    with compile_deferred():
        import megatron.core  # noqa: F401
