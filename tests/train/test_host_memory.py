"""parallel/host_memory.py: on a CPU run glibc's malloc keeps freed blocks, so reallocating a large tensor
(as every training step does with its activations) faults no pages in again; the environment's own malloc
tuning wins; ``init_parallel`` applies it on the CPU."""

from __future__ import annotations

import textwrap

import pytest
import torch

from megatron_grm.parallel import host_memory
from tests.conftest import python_json

# Faults taken by each of `cycles` steps that allocate a training step's large activations (several tensors
# of 16-64 MiB, alive together, touched, freed in another order than allocated).
REALLOCATION_FAULTS = textwrap.dedent("""
    import resource
    import torch

    def one_step():
        a = torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
        b = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
        c = torch.empty(32 << 20, dtype=torch.uint8).fill_(1)
        del b
        d = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
        del a, c, d

    def faults_of_reallocating(cycles=1):
        faults = []
        for _ in range(cycles):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            one_step()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return faults if cycles > 1 else faults[0]
""")


def test_freed_blocks_are_reused_without_faulting_pages_in():
    """Before: every step maps its blocks afresh. After: the heap grows to hold them over the first steps,
    and from then on every step reuses them.

    The step allocates several sizes, as training does. A single 64 MiB tensor reallocated alone is not
    reliably reused: when a small allocation lands just past the freed block, the next 64-byte-aligned
    request of the same size no longer fits there, and each cycle takes fresh heap (as in every run here
    once this process imported less before the test, session 38). Real steps do not show it: 60 bootstrap
    steps took 232 thousand faults with it, against 8.6 million and 23 s of system time without."""
    out = python_json(REALLOCATION_FAULTS + textwrap.dedent("""
        import json
        from megatron_grm.parallel import host_memory
        plain = faults_of_reallocating(4)
        applied = host_memory.keep_freed_host_memory(cuda=False)
        kept = faults_of_reallocating(8)
        print(json.dumps({"plain": plain, "applied": applied, "kept": kept,
                          "again": host_memory.keep_freed_host_memory(cuda=False)}))
    """))
    assert out["applied"] and out["again"]
    assert min(out["plain"]) >= 16, out  # glibc maps each block afresh: at least one fault per 4 MiB
    assert sum(out["kept"][4:]) * 10 < min(out["plain"]), out


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
