"""Keep freed host memory inside the process on CPU runs, so a training step does not re-fault its pages.

PyTorch's CPU tensors come from glibc's ``malloc``. Blocks over its mmap threshold (at most 32 MiB) are
mapped on allocation and unmapped on free, and the heap's top is given back to the kernel once more than
the trim threshold is free. A training step allocates and frees the same large activations every
micro-batch (fc1's output and its gradient: 46 MB per layer for 2 × 1024 tokens at ffn 2816), so every
step faults them in again, one zeroed 4 KiB page at a time. Measured on the RFT-shaped benchmark
(``bench/train_step.py --seq 1024 --batch 2 --response-tokens 256``, 2-core EPYC): 90-160 thousand
minor faults and 0.5-0.9 s of system time per step on our side, none on the ``transformers`` side, whose
separate gate/up projections stay under the threshold.

:func:`keep_freed_host_memory` turns both off through ``mallopt`` (no mmap-served blocks, no trimming),
which is what the CUDA caching allocator does for device memory: the process keeps its peak and reuses it.
It covers the main thread's heap, where the training loop and the CPU backward allocate; glibc's other
threads' arenas still map blocks over 64 MiB afresh. Forked children (data workers) inherit it. A process
whose environment tunes the allocator itself (``GLIBC_TUNABLES`` with ``glibc.malloc``, the ``MALLOC_*_``
variables, or another malloc in ``LD_PRELOAD`` such as jemalloc or tcmalloc) keeps its settings; on a C
library without ``mallopt`` nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
GLIBC_MMAP_MAX_DEFAULT = 65536

_applied: bool | None = None  # what the first call decided; later calls repeat it


def environment_tunes_malloc(environ: Mapping[str, str] = os.environ) -> str | None:
    """The variable through which this process's environment already tunes (or replaces) glibc's malloc."""
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "malloc" in environ.get("LD_PRELOAD", ""):  # libjemalloc.so, libtcmalloc.so, libmimalloc.so, ...
        return "LD_PRELOAD"
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if name in environ:
            return name
    return None


def keep_freed_host_memory(cuda: bool) -> bool:
    """On a CPU run, make glibc's malloc keep freed memory for reuse (see the module docstring); returns
    whether it does. Logs which allocator behaviour the process runs with, once."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if cuda:
        return False  # device memory is the CUDA caching allocator's; host allocations are small there
    tuned_by = environment_tunes_malloc()
    if tuned_by is not None:
        log.info("host memory: glibc malloc as the environment tunes it (%s)", tuned_by)
        return False
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    if mallopt is None:
        log.info("host memory: this C library has no mallopt; freed blocks may go back to the kernel")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 as the trim threshold disables trimming (mallopt(3)); 0 mmap-served blocks puts every block on the heap.
    if mallopt(M_MMAP_MAX, 0) != 1:
        log.warning("host memory: mallopt refused; freed blocks may go back to the kernel")
        return False
    if mallopt(M_TRIM_THRESHOLD, -1) != 1:
        mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX_DEFAULT)  # all or nothing
        log.warning("host memory: mallopt refused; freed blocks may go back to the kernel")
        return False
    _applied = True
    log.info("host memory: glibc malloc keeps freed blocks (no mmap-served blocks, no trimming; "
             "parallel/host_memory.py)")
    return True
