"""Import Megatron-Core without paying for TorchDynamo in every process.

Megatron-Core decorates its fused kernels (bias-GeLU, SwiGLU, RoPE, ...) with ``torch.compile`` when its
modules are imported. Building those wrappers imports TorchDynamo and Inductor: 1.5-1.6 s of CPU in each
process (Megatron-Core's import, 2.7-2.9 s against 1.1-1.3 s without it, on this 2-core machine). The suite
and the demo start many torchrun ranks and tool processes, and most never call a fused kernel (on CPU
none is called). While Megatron-Core's package is imported, ``torch.compile`` returns lazy wrappers, so a
decorated function is compiled by the real ``torch.compile``, with the same arguments, at its first call.
Nothing else changes: compiling happened at the first call before too.

``import megatron_grm`` installs :func:`defer_compile_in_megatron_core_import`, an import hook, so it holds
whichever module imports Megatron-Core first (a stage that reads its data with ``megatron.core.datasets``
before it sets up parallel state paid the 1.5 s in every rank while a helper did this import by hand).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

MEGATRON_CORE = "megatron.core"


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
    import torch

    real = torch.compile
    torch.compile = lazy_compile(real)
    try:
        yield
    finally:
        torch.compile = real


class _DeferredCompileLoader(importlib.abc.Loader):
    """Megatron-Core's own loader, executing its package's ``__init__`` inside :func:`compile_deferred`
    (which covers every submodule that ``__init__`` imports: all of the fused kernels' modules)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with compile_deferred():
            self.loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # is_package, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)


class _MegatronCoreFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core`` as the path finder does and wraps its loader; steps aside after that."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != MEGATRON_CORE:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferredCompileLoader(spec.loader)
        return spec


def defer_compile_in_megatron_core_import() -> None:
    """Have Megatron-Core's first import (by any module, later in this process) build its ``torch.compile``
    wrappers lazily. A no-op once it is imported or while the hook is in place."""
    if MEGATRON_CORE in sys.modules or any(isinstance(f, _MegatronCoreFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MegatronCoreFinder())
