"""Host tensors on transparent huge pages, their memory kept for reuse: a CPU rollout's KV cache and packed weights.

A CPU decode step at GRM prompt lengths is mostly one read of the KV cache (bench/rollout.py's wave: 317 MB a
step in fp32). Read through 4 KiB pages, that read walks ~78,000 page-table entries a step; through 2 MiB
pages ~150. On the project's 2-core AVX-512 Xeon the decode attention kernel read a rollout-shaped cache at
26-27 GB/s on 4 KiB pages and 29-31 GB/s on huge ones (session 53, a C++ harness over the kernel). But Linux
there gives huge pages only to memory advised for them (``transparent_hugepage/enabled`` is ``madvise``), and
there the first touch of a fresh advised mapping is slow: 40-55 MB took 2.6-4.9 ms usually but 184-312 ms in 5
of 20 tries, with no compaction stall counted (session 54; a virtual machine, whose host likely backs a 2 MiB
page on its first touch). Sessions 47 and 51 put each wave's cache on new advised mappings and lost 0.5-0.8 s
a rollout that way. So :class:`HugePagePool` maps and advises memory once and hands it out again, as a GPU
engine allocates its KV buffer once: a tensor's mapping returns to the pool when the last view of the tensor
dies (a finalizer on its storage), and the next wave's caches reuse it, already faulted in. The C++ GEMM's
packed weights (67 MB a step, re-packed every wave) come from it too. bench/rollout.py's wave, our engine
alone in one process, the pool on and off in turn (5 rounds each): 9.44 against 9.71 s (medians), its decode
attention 12.0-12.6 against 13.6-14.1 ms a step in the bench's clocked runs.

The pool keeps what it mapped (like the CUDA caching allocator): its idle mappings are the next wave's. A
process pays each mapping's first touch once: there, a fresh process's first bench-sized rollout took
12.1-12.6 s against 9.2-9.3 s with ``MEGATRON_GRM_HUGE_PAGES=0``, its later ones 8.4-9.4 against 8.9-9.2 s
(session 54), so on such a machine a short-lived process with a large cache is better off with the switch. A
request takes the smallest idle mapping it fits, so the caches and the weights keep finding their own sizes;
one that no idle mapping fits (a wave longer than any before it) grows the largest idle one in place of
mapping afresh (``mremap`` moves its faulted-in pages along; only the new tail is touched first), and the
smaller idle ones stay for the wave's smaller requests. Eight waves of varying lengths, their allocations
recorded and replayed (session 54): after the first wave 32 MB were touched afresh this way, against 424 MB
when a miss unmapped every idle mapping as before, at the same peak (~510 MB). :meth:`HugePagePool.release`
unmaps the idle ones. Where the kernel grants no huge pages (``never``, or not Linux) or with
``MEGATRON_GRM_HUGE_PAGES=0``, :func:`host_empty` allocates with torch as before; the log says which runs.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
DISABLE_VARIABLE = "MEGATRON_GRM_HUGE_PAGES"


def transparent_huge_pages() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``); ``never`` where there is
    no such setting or Python cannot advise a mapping."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "never"
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "never"
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "never"


class HugePagePool:
    """Anonymous private mappings advised for huge pages, each handed out as one tensor at a time."""

    def __init__(self) -> None:
        self._idle: list[mmap.mmap] = []
        # Re-entrant: a storage's finalizer can run inside _take when an allocation there triggers the GC.
        self._lock = threading.RLock()
        self.mapped_bytes = 0  # every mapping the pool holds, lent or idle

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor on pool memory."""
        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        mapping = self._take(max(nbytes, 1))
        tensor = torch.frombuffer(mapping, dtype=dtype, count=count).view(*shape)
        # The storage's Python object lives as long as any view of it (torch keeps it with the C++ storage),
        # so its finalizer runs when the last view dies; the mapping goes back to the idle list then.
        weakref.finalize(tensor.untyped_storage(), self._give_back, mapping)
        return tensor

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(len(mapping) for mapping in self._idle)

    def release(self) -> int:
        """Unmap every idle mapping; returns how many bytes went back to the kernel."""
        with self._lock:
            idle, self._idle = self._idle, []
        return self._unmap(idle)

    def _take(self, nbytes: int) -> mmap.mmap:
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        with self._lock:
            fitting = [mapping for mapping in self._idle if len(mapping) >= nbytes]
            if fitting:
                best = min(fitting, key=len)
                self._idle.remove(best)
                return best
            # Every idle mapping is too small (a wave longer than any before it): grow the largest, whose
            # pages are faulted in already, rather than map all of it afresh; the others stay for smaller
            # requests later in the wave (its packed weights).
            largest = max(self._idle, key=len, default=None)
            if largest is not None:
                self._idle.remove(largest)
        if largest is not None:
            grown = self._grow(largest, size)
            if grown is not None:
                return grown
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
        with self._lock:
            self.mapped_bytes += size
        return mapping

    def _grow(self, mapping: mmap.mmap, size: int) -> mmap.mmap | None:
        """``mapping`` resized to ``size`` bytes (``mremap``: its pages move with it and keep their advice, only
        the new tail is fresh); None, with the mapping unmapped, where this platform cannot resize it."""
        before = len(mapping)
        try:
            mapping.resize(size)
        except (OSError, SystemError):  # SystemError: no mremap on this platform
            self._unmap([mapping])
            return None
        with self._lock:
            self.mapped_bytes += size - before
        return mapping

    def _unmap(self, mappings: list[mmap.mmap]) -> int:
        freed = sum(len(mapping) for mapping in mappings)
        for mapping in mappings:
            mapping.close()
        with self._lock:
            self.mapped_bytes -= freed
        return freed

    def _give_back(self, mapping: mmap.mmap) -> None:
        with self._lock:
            self._idle.append(mapping)


_pool: HugePagePool | None = None
_logged = False


def pool() -> HugePagePool | None:
    """The process's pool, or None where the kernel grants no transparent huge pages or
    ``MEGATRON_GRM_HUGE_PAGES=0`` turns it off."""
    global _pool, _logged
    switched_off = os.environ.get(DISABLE_VARIABLE) == "0"
    mode = "never" if switched_off else transparent_huge_pages()
    if not _logged:
        _logged = True
        if switched_off:
            log.info("rollout KV caches and packed weights: torch's allocator (%s=0)", DISABLE_VARIABLE)
        elif mode == "never":
            log.info("rollout KV caches and packed weights: torch's allocator (this kernel grants no transparent "
                     "huge pages)")
        else:
            log.info("rollout KV caches and packed weights: reused mappings on transparent huge pages (THP mode %s; "
                     "parallel/huge_pages.py)", mode)
    if mode == "never":
        return None
    if _pool is None:
        _pool = HugePagePool()
    return _pool


def host_empty(shape: Sequence[int], dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
    """A contiguous CPU tensor on the pool's huge pages where the kernel grants them, else torch's."""
    huge = pool()
    if huge is None:
        return (torch.zeros if zeros else torch.empty)(*shape, dtype=dtype)
    tensor = huge.empty(shape, dtype)
    return tensor.zero_() if zeros else tensor
