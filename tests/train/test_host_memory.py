"""parallel/host_memory.py: on a CPU run glibc's malloc keeps freed blocks, so reallocating a large tensor
(as every training step does with its activations) faults no pages in again; the environment's own malloc
tuning wins; ``init_parallel`` applies it on the CPU."""

from __future__ import annotations

import textwrap

import pytest
import torch

from megatron_grm.parallel import host_memory
from tests.conftest import python_json

# Faults taken by each of `cycles` allocations of a 64 MiB tensor, touched and freed (what every training
# step does with its large activations).
REALLOCATION_FAULTS = textwrap.dedent("""
    import resource
    import torch

    def faults_of_reallocating(cycles=1):
        faults = []
        for _ in range(cycles):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return faults if cycles > 1 else faults[0]
""")


def test_freed_blocks_are_reused_without_faulting_pages_in():
    """Before: every cycle maps the block afresh. After: the heap grows to hold it (once, or twice when a
    small allocation lands beside the freed block and the aligned request no longer fits there, as in 3
    of 12 runs here), and from then on every cycle reuses it."""
    out = python_json(REALLOCATION_FAULTS + textwrap.dedent("""
        import json
        from megatron_grm.parallel import host_memory
        plain = faults_of_reallocating(4)
        applied = host_memory.keep_freed_host_memory(cuda=False)
        kept = faults_of_reallocating(6)
        print(json.dumps({"plain": plain, "applied": applied, "kept": kept,
                          "again": host_memory.keep_freed_host_memory(cuda=False)}))
    """))
    assert out["applied"] and out["again"]
    assert min(out["plain"]) >= 16, out  # glibc maps a 64 MiB block afresh: at least one fault per 4 MiB
    assert sum(out["kept"][2:]) * 10 < min(out["plain"]), out


def test_cuda_runs_and_the_environments_own_tuning_are_left_alone():
    out = python_json(REALLOCATION_FAULTS + textwrap.dedent("""
        import json, os
        from megatron_grm.parallel import host_memory
        on_cuda = host_memory.keep_freed_host_memory(cuda=True)
        host_memory._applied = None
        os.environ["MALLOC_TRIM_THRESHOLD_"] = "131072"  # read by the test below only; glibc read it at start
        tuned = host_memory.keep_freed_host_memory(cuda=False)
        print(json.dumps({"on_cuda": on_cuda, "tuned": tuned, "faults": faults_of_reallocating()}))
    """))
    assert not out["on_cuda"] and not out["tuned"]
    assert out["faults"] >= 16, out  # malloc as before: the block is mapped afresh


def test_environment_tunes_malloc_names_the_variable():
    assert host_memory.environment_tunes_malloc({}) is None
    assert host_memory.environment_tunes_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None
    assert host_memory.environment_tunes_malloc(
        {"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.mmap_max=0"}) == "GLIBC_TUNABLES"
    assert host_memory.environment_tunes_malloc({"MALLOC_MMAP_THRESHOLD_": "1"}) == "MALLOC_MMAP_THRESHOLD_"
    assert host_memory.environment_tunes_malloc({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD"
    assert host_memory.environment_tunes_malloc({"LD_PRELOAD": "/usr/lib/libfoo.so"}) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="init_parallel applies it on CPU runs only")
def test_init_parallel_applies_it_on_the_cpu():
    out = python_json(textwrap.dedent("""
        import json
        from megatron_grm.parallel import host_memory
        from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel
        init_parallel(ParallelLayout())
        print(json.dumps({"applied": host_memory._applied}))
        destroy_parallel()
    """))
    assert out == {"applied": True}
