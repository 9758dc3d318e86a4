"""The C++ decode attention (parallel/csrc/decode_attention.cpp): built with this machine's compiler, against
a float64 attention written out here, and what happens where it cannot be built."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_grm.parallel import cpu_decode_kernel

from .conftest import with_march

needs_compiler = pytest.mark.skipif(cpu_decode_kernel._compiler() is None, reason="no C++ compiler here")


def _forget() -> None:
    """Drop the cached probe so the next call re-reads the environment."""
    for cached in (cpu_decode_kernel._library_path, cpu_decode_kernel._build_error, cpu_decode_kernel._loaded,
                   cpu_decode_kernel._compiled_dtypes, cpu_decode_kernel._prefill_built,
                   cpu_decode_kernel.amx_available):
        cached.cache_clear()


@pytest.fixture
def fresh_probe():
    _forget()
    yield
    _forget()


def _reference(queries, keys, values, start, end, mask, scale):
    """float64: each query over positions [start, end) of its row's KV group, minus masked positions."""
    q, k, v = queries.double(), keys[:, :, start:end].double(), values[:, :, start:end].double()
    if start == end:  # no positions: nothing seen
        shape = queries.shape[:-1] + (1,)
        return torch.full(shape, float("-inf"), dtype=q.dtype), torch.zeros(shape, dtype=q.dtype), torch.zeros_like(q)
    scores = torch.einsum("bgrd,bgtd->bgrt", q, k) * scale
    if mask is not None:
        scores = scores + mask[:, None, None, start:end].double()
    top = scores.amax(-1, keepdim=True)
    weights = (scores - top.nan_to_num(neginf=0.0)).exp()
    total = weights.sum(-1, keepdim=True)
    out = torch.einsum("bgrt,bgtd->bgrd", weights, v) / total.clamp(min=1e-300)
    return top, total, out


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
@pytest.mark.parametrize("dim,rep", [(16, 2), (32, 1), (32, 3), (64, 2), (64, 4), (64, 5), (128, 1), (128, 3),
                                     (128, 7), (24, 3)])
@pytest.mark.parametrize("span", [(0, 200), (70, 131), (63, 65), (9, 9)])
def test_kernel_matches_float64_attention(dtype, tol, dim, rep, span):
    """Blocks of 64 positions with ragged ends, the channel counts compiled for (16, 32, 64 and 128; 24 takes
    the generic loop) with the query heads in register tiles 4 at a time (AVX2 and AVX-512; 5 and 7: two
    groups), masks that hide a whole row's block and a whole row, and scores large enough to
    overflow a softmax without its maximum subtracted. Tolerances are relative to float64 on the cache's
    own (rounded) values, so 16-bit caches are held to fp32 arithmetic."""
    if not cpu_decode_kernel.available(dtype):  # fp16 needs a compiler with _Float16 (GCC >= 12, clang)
        pytest.skip(f"this compiler's build of the kernel has no {dtype}")
    g = torch.Generator().manual_seed(dim + rep)
    b, groups, positions = 3, 2, 210
    start, end = span
    queries = torch.randn(b, groups, rep, dim, generator=g) * 4
    keys = (torch.randn(b, groups, positions, dim, generator=g) * 4).to(dtype)
    values = (torch.randn(b, groups, positions, dim, generator=g) * 100).to(dtype)
    mask = torch.zeros(b, positions)
    mask[1, :100] = float("-inf")  # row 1: a left-padded prompt, whole 64-blocks hidden
    mask[2] = float("-inf")  # row 2: nothing visible
    scale = dim ** -0.5
    top, total, out = cpu_decode_kernel.attend(queries, keys, values, start, end, mask, scale)
    want_top, want_total, want_out = _reference(queries, keys, values, start, end, mask, scale)
    assert top.shape == total.shape == (b, groups, rep, 1) and out.shape == (b, groups, rep, dim)
    assert out.dtype == torch.float32
    torch.testing.assert_close(top.double(), want_top, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(total.double(), want_total, rtol=tol * 10, atol=0)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=tol * 100 * 10)  # values ~ +-300
    assert (total[2] == 0).all() and (out[2] == 0).all() and (top[2] == float("-inf")).all()
    if end > start:
        assert (total[0] >= 1).all()  # the maximum's own term is exp(0) = 1


@needs_compiler
def test_kernel_reads_a_strided_cache_and_no_mask():
    """Megatron's cache is [positions, rows, heads, dim]: the kernel takes its [rows, heads, positions, dim]
    view as it is (positions far apart), and no mask at all."""
    g = torch.Generator().manual_seed(1)
    b, groups, positions, dim, rep = 4, 3, 90, 64, 2
    cache_k, cache_v = (torch.randn(positions, b, groups, dim, generator=g) for _ in range(2))
    keys, values = cache_k.permute(1, 2, 0, 3), cache_v.permute(1, 2, 0, 3)
    assert not keys.is_contiguous()
    queries = torch.randn(b, groups, rep, dim, generator=g)
    got = cpu_decode_kernel.attend(queries, keys, values, 5, 90, None, 0.125)
    want = _reference(queries, keys, values, 5, 90, None, 0.125)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=2e-6, atol=2e-6)


@needs_compiler
def test_kernel_rejects_what_it_cannot_read():
    queries = torch.randn(2, 1, 1, 8)
    keys = torch.randn(2, 1, 16, 8)
    with pytest.raises(ValueError, match="dtype"):
        cpu_decode_kernel.attend(queries, keys.double(), keys.double(), 0, 4, None, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        cpu_decode_kernel.attend(queries, keys[:, :, :, :4], keys[:, :, :, :4], 0, 4, None, 1.0)
    with pytest.raises(ValueError, match=r"positions \[0, 17\)"):
        cpu_decode_kernel.attend(queries, keys, keys, 0, 17, None, 1.0)
    with pytest.raises(ValueError, match="contiguous channels"):
        strided = torch.randn(2, 1, 8, 16).transpose(2, 3)  # [2, 1, 16, 8], channels 16 elements apart
        cpu_decode_kernel.attend(queries, strided, strided, 0, 4, None, 1.0)
    with pytest.raises(ValueError, match="mask"):
        cpu_decode_kernel.attend(queries, keys, keys, 0, 4, torch.zeros(2, 3), 1.0)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_probe_sums_every_element_once(threads):
    """The read probe (csrc/read_probe.cpp) splits a buffer into pieces per thread and reads them in turn: its
    sum is the float64 sum for sizes that leave no remainder, a remainder, or fewer elements than pieces."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 5, 15, 64, 1023, 4096 * 12, 4096 * 12 + 13, (1 << 20) + 7):
            x = torch.rand(n, generator=torch.Generator().manual_seed(n))
            got = cpu_decode_kernel.read_probe(x)
            assert got == pytest.approx(x.double().sum().item(), rel=1e-5, abs=1e-5), n
            x[-1] += 1000.0  # the last element counts (the remainder after the pieces)
            assert cpu_decode_kernel.read_probe(x) == pytest.approx(got + 1000.0, rel=1e-5), n
            x[0] += 1000.0
            assert cpu_decode_kernel.read_probe(x) == pytest.approx(got + 2000.0, rel=1e-5), n
    finally:
        torch.set_num_threads(before)
    assert cpu_decode_kernel.read_probe(torch.empty(0)) == 0.0
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_decode_kernel.read_probe(torch.rand(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous: False"):
        cpu_decode_kernel.read_probe(torch.rand(8, 8).t())


@needs_compiler
def test_ranks_building_at_once_each_load_a_whole_library(tmp_path, monkeypatch, fresh_probe):
    """Two processes start on an empty cache together (ranks of one job on a shared home): one builds while
    the other waits for it, so the compiler runs once, each loads a complete library, and only the library
    is left (no lock file, no half-written build); a later process loads it without compiling again."""
    script = ("import logging, sys, torch; from megatron_grm.parallel import cpu_decode_kernel as k; "
              "logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
              "q = torch.ones(1, 1, 1, 8); c = torch.ones(1, 1, 4, 8); "
              "assert k.available(torch.float32), k.describe(); "
              "print(float(k.attend(q, c, c, 0, 4, None, 1.0)[2].sum()))")
    env = {**os.environ, "MEGATRON_GRM_KERNEL_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-2000:]
        assert float(out.strip()) == 8.0
    logs = [err for _, err in results]
    assert sum("built the C++ attention kernels" in err for err in logs) == 1, logs
    (built,) = tmp_path.iterdir()
    assert built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    monkeypatch.setenv("MEGATRON_GRM_KERNEL_DIR", str(tmp_path))  # this process, as a later one: loads, no compile
    assert cpu_decode_kernel.available(torch.bfloat16) and not cpu_decode_kernel.available(torch.float64)
    assert str(built) in cpu_decode_kernel.describe()
    assert list(tmp_path.iterdir()) == [built] and built.stat().st_mtime_ns == stamp


@needs_compiler
def test_a_process_waits_for_a_build_in_progress_and_then_loads_it(tmp_path, monkeypatch, fresh_probe, caplog):
    """While another process holds the build lock, this one waits (and says so) instead of compiling, then
    loads the library that process put in place and leaves no lock file behind."""
    assert cpu_decode_kernel.available(torch.float32)  # this machine's library, in the usual cache
    staged = tmp_path / "staged.so"
    shutil.copy(cpu_decode_kernel._library_path(), staged)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MEGATRON_GRM_KERNEL_DIR", str(cache))
    _forget()
    path = cpu_decode_kernel._library_path()
    holder = subprocess.Popen(  # another rank's build: holds the lock 3 s, then renames its library into place
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(3); "
         "os.replace(sys.argv[2], sys.argv[3]); os.unlink(sys.argv[1])",
         f"{path}.lock", str(staged), str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    began = time.perf_counter()
    with caplog.at_level(logging.INFO, logger=cpu_decode_kernel.__name__):
        assert cpu_decode_kernel.available(torch.float32)
    waited = time.perf_counter() - began
    assert holder.wait(timeout=60) == 0
    assert waited > 2, waited  # it waited for the holder's build rather than running the compiler beside it
    assert "waiting for another process's build" in caplog.text
    assert "built the C++ attention kernels" not in caplog.text
    assert list(cache.iterdir()) == [path]


def test_without_a_compiler_the_torch_path_is_named_and_the_kernel_refuses(tmp_path, monkeypatch, fresh_probe):
    monkeypatch.setenv("MEGATRON_GRM_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not cpu_decode_kernel.available(torch.float32)
    assert "torch decode attention" in cpu_decode_kernel.describe()
    assert "no working C++ compiler" in cpu_decode_kernel.describe()
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_decode_kernel.attend(torch.ones(1, 1, 1, 8), torch.ones(1, 1, 4, 8), torch.ones(1, 1, 4, 8), 0, 4, None,
                                 1.0)
    _forget()
    monkeypatch.delenv("CXX")
    monkeypatch.setenv(cpu_decode_kernel.DISABLE_VARIABLE, "0")
    assert not cpu_decode_kernel.available(torch.float32)
    assert f"{cpu_decode_kernel.DISABLE_VARIABLE}=0" in cpu_decode_kernel.describe()
    assert list(tmp_path.iterdir()) == []


def _logging_compiler(folder: Path, body: str) -> tuple[Path, Path]:
    """A ``$CXX`` that appends each compile or link command to a log, then runs ``body`` (answering
    ``--version`` as the real compiler does, which the library's name hashes)."""
    real, log = cpu_decode_kernel._compiler(), folder / "compiler.log"
    script = folder / "cxx"
    script.write_text(f'#!/bin/sh\ncase " $* " in *" --version "*) exec "{real}" "$@" ;; esac\n'
                      f'echo "$*" >> "{log}"\n{body}\n')
    script.chmod(0o755)
    return script, log


def _compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@needs_compiler
def test_a_failed_build_names_the_source_stops_and_is_not_compiled_again(tmp_path, monkeypatch, fresh_probe):
    """The compiler rejects a source: the reason names it, the units not started yet are not compiled, no
    library is left for a process to load, and the errors are recorded, so the next process (another rank, a
    later run) reports them without compiling; deleting the record retries."""
    broken = tmp_path / "decode_attention.cpp"
    broken.write_text("this is not C++\n")
    cache = tmp_path / "cache"
    cxx, log = _logging_compiler(tmp_path, f'exec "{cpu_decode_kernel._compiler()}" "$@"')
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("MEGATRON_GRM_KERNEL_DIR", str(cache))
    monkeypatch.setattr(cpu_decode_kernel, "SOURCES", (broken, *cpu_decode_kernel.SOURCES[1:]))
    monkeypatch.setattr(cpu_decode_kernel, "_cores", lambda: 1)  # one unit at a time: the first one fails
    assert not cpu_decode_kernel.available(torch.float32)
    reason = cpu_decode_kernel.describe()
    assert str(broken) in reason and "failed on" in reason and "error" in reason, reason
    assert _compiles(log) == 1 < len(cpu_decode_kernel._compile_units())
    (record,) = cache.iterdir()  # no library, no lock, no scratch folder: the failure's record alone
    assert record.suffix == ".failed" and str(broken) in record.read_text()

    _forget()  # a new process
    assert not cpu_decode_kernel.available(torch.float32)
    again = cpu_decode_kernel.describe()
    assert "an earlier build failed here" in again and str(record) in again and str(broken) in again
    assert _compiles(log) == 1

    record.unlink()
    _forget()
    assert not cpu_decode_kernel.available(torch.float32)
    assert _compiles(log) == 2 and record.exists()


@needs_compiler
def test_a_compiler_killed_mid_build_is_not_recorded_and_the_next_process_builds(tmp_path, monkeypatch, fresh_probe):
    """A compiler that dies (the OOM killer, a node's limits) says nothing about the sources: no record is
    left, and the next process compiles again."""
    cxx, log = _logging_compiler(tmp_path, 'kill -KILL $$')
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("MEGATRON_GRM_KERNEL_DIR", str(cache))
    assert not cpu_decode_kernel.available(torch.float32)
    assert "failed on" in cpu_decode_kernel.describe()
    first = _compiles(log)
    assert first >= 1 and list(cache.iterdir()) == []
    _forget()
    assert not cpu_decode_kernel.available(torch.float32)
    assert _compiles(log) > first and list(cache.iterdir()) == []


def test_the_decode_attention_compiles_once_per_cache_dtype_and_first():
    """Its dtypes' kernels were two thirds of a build's CPU time in one unit, which no other compiler could
    share; as a unit per dtype, started first, they run beside the other sources'."""
    units = cpu_decode_kernel._compile_units()
    per_dtype = [defines for source, defines in units if source.name == cpu_decode_kernel.PER_DTYPE_SOURCE]
    assert per_dtype == [(f"-DMGRM_DECODE_DTYPE={code}",) for code in cpu_decode_kernel.DTYPE_CODES.values()]
    assert units[:len(per_dtype)] == [(cpu_decode_kernel.SOURCES[0], defines) for defines in per_dtype]
    assert sorted(source for source, _ in units[len(per_dtype):]) == sorted(cpu_decode_kernel.SOURCES[1:])


@needs_compiler
def test_the_decode_attention_compiled_without_a_dtype_says_which_define_it_needs():
    source = cpu_decode_kernel.SOURCES[0]
    result = subprocess.run([cpu_decode_kernel._compiler(), "-std=c++17", "-fsyntax-only", str(source)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "-DMGRM_DECODE_DTYPE=0" in result.stderr, result.stderr[-2000:]


# Without AVX-512, -march=native compiles the same AVX2 code paths as -march=haswell, and every test of the
# native library runs them: a second full build (~40 s of CPU) would check nothing more.
NATIVE_IS_AVX2 = "this CPU's own build is an AVX2 build, tested by every test of the native library"


def _cpu_flags() -> set[str]:
    try:
        return {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


@needs_compiler
def test_the_build_names_the_vector_instructions_this_cpu_has():
    """-march=native: AVX-512 where the CPU has it, else AVX2 (with FMA and F16C), else the scalar loops and
    no prefill kernel; the log line says which."""
    if platform.machine() != "x86_64":
        pytest.skip("an x86-64 CPU's flags")
    flags = _cpu_flags()
    want = ("AVX-512" if "avx512f" in flags else "AVX2" if {"avx2", "fma", "f16c"} <= flags else "scalar")
    assert cpu_decode_kernel._library().mgrm_attention_simd().decode() == want
    assert cpu_decode_kernel.prefill_available(torch.float32, 64) == (want != "scalar")
    assert (f"prefill attention kernels, {want}" in cpu_decode_kernel.describe()) == (want != "scalar")


@needs_compiler
@pytest.mark.parametrize("march,simd", [("x86-64", "scalar"), ("haswell", "AVX2")])
def test_a_build_for_an_older_x86_cpu_computes_the_same(march, simd, other_cpu_builds, monkeypatch, fresh_probe):
    """The kernels built for an older x86-64 than this one (as a cache shared with such nodes holds them): a
    CPU with AVX-512 also checks the AVX2 micro-kernels this way, and any x86-64 the scalar decode loops with
    the prefill declined."""
    if platform.machine() != "x86_64" or (simd == "AVX2" and not {"avx2", "fma", "f16c"} <= _cpu_flags()):
        pytest.skip(f"needs an x86-64 CPU that runs {march} code")
    if simd == "AVX2" and "avx512f" not in _cpu_flags():
        pytest.skip(NATIVE_IS_AVX2)
    monkeypatch.setenv("MEGATRON_GRM_KERNEL_DIR", str(other_cpu_builds))
    monkeypatch.setattr(cpu_decode_kernel, "FLAGS", with_march(cpu_decode_kernel.FLAGS, march))
    assert cpu_decode_kernel._library().mgrm_attention_simd().decode() == simd
    assert str(other_cpu_builds) in cpu_decode_kernel.describe()
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 1e-5)):
        test_kernel_matches_float64_attention(dtype, tol, 32, 1, (9, 200))
        test_kernel_matches_float64_attention(dtype, tol, 64, 2, (0, 200))
        test_kernel_matches_float64_attention(dtype, tol, 128, 3, (70, 131))
    test_read_probe_sums_every_element_once(2)
    assert cpu_decode_kernel.prefill_available(torch.float32, 64) == (simd != "scalar")
    if simd == "scalar":
        with pytest.raises(RuntimeError, match="needs AVX-512 or AVX2"):
            cpu_decode_kernel.prefill_attention(*_split_qkv(8, 1, 2, 2, 64, torch.float32, seed=0), None, 0.125)
        return
    for dtype in (torch.float32, torch.bfloat16):
        test_prefill_kernel_matches_float64_causal_attention(dtype, 64, 8, 4, 200, [0, 13, 199])
        test_prefill_kernel_matches_float64_causal_attention(dtype, 128, 4, 1, 77, [5, 0])


@needs_compiler
def test_kernel_skips_each_rows_left_padding_without_reading_it():
    """``row_start``: a row's positions before it are not read at all (NaN there changes nothing), a start
    before the range's is the range's, and one past its end leaves the row seeing nothing."""
    g = torch.Generator().manual_seed(2)
    b, groups, rep, positions, dim = 4, 2, 2, 150, 64
    queries = torch.randn(b, groups, rep, dim, generator=g)
    keys, values = (torch.randn(b, groups, positions, dim, generator=g) for _ in range(2))
    leading = torch.tensor([0, 70, 3, 149])
    mask = torch.zeros(b, positions)
    for row, count in enumerate(leading.tolist()):
        mask[row, :count] = float("-inf")
        keys[row, :, :count] = values[row, :, :count] = float("nan")
    got = cpu_decode_kernel.attend(queries, keys, values, 10, 140, mask, 0.125, row_start=leading)
    want = _reference(queries, keys.nan_to_num(), values.nan_to_num(), 10, 140, mask, 0.125)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=2e-6, atol=2e-6)
    assert (got[1][3] == 0).all() and (got[2][3] == 0).all()  # row 3 starts past the range: nothing seen
    with pytest.raises(ValueError, match="row_start"):
        cpu_decode_kernel.attend(queries, keys, values, 0, 4, None, 1.0, row_start=leading[:3])


needs_prefill_kernel = pytest.mark.skipif(not cpu_decode_kernel.prefill_available(torch.float32, 64),
                                          reason="the C++ prefill kernel needs a compiler and AVX-512 or AVX2")


def _prefill_reference(query, key, value, pads, scale):
    """float64, per row: causal attention over the real positions after the row's padding, each padding
    position's output its own value (it sees only itself). Megatron's layout [s, b, heads, d]."""
    s, b, h_q, d = query.shape
    rep = h_q // key.shape[2]
    out = torch.empty(s, b, h_q, d, dtype=torch.float64)
    for row, pad in enumerate(pads):
        q, k, v = (t[pad:, row].double().transpose(0, 1) for t in (query, key, value))  # [heads, n, d]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        n = s - pad
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[pad:, row] = (scores.softmax(-1) @ v).transpose(0, 1)
        out[:pad, row] = value[:pad, row].double().repeat_interleave(rep, 1)
    return out


def _split_qkv(s, b, h_q, h_kv, dim, dtype, seed):
    """Query, key and value as Megatron splits its fused QKV projection: views into one tensor, so positions,
    rows and heads are far apart and only the channels are contiguous."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(s, b, h_q + 2 * h_kv, dim, generator=g) * 2
    fused[..., h_q + h_kv:, :] /= 2  # values of unit scale
    fused = fused.to(dtype)
    return fused[:, :, :h_q], fused[:, :, h_q:h_q + h_kv], fused[:, :, h_q + h_kv:]


@needs_prefill_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,h_q,h_kv,s,pads", [
    (64, 8, 4, 200, [0, 13, 199]),  # the last row: all padding but its last position
    (128, 4, 1, 77, [5, 0]),
    (16, 4, 2, 50, [0, 49, 7]),
    (32, 6, 2, 131, [64, 0]),  # tiles of 12 queries and blocks of 64 keys with ragged ends
    (64, 2, 2, 1, [0]),
])
def test_prefill_kernel_matches_float64_causal_attention(dtype, dim, h_q, h_kv, s, pads):
    """Against float64 and, as a yardstick, torch's SDPA on the same rounded inputs: the kernel's error is
    within twice SDPA's (16-bit: the output's own rounding) and, in fp32, under 1e-5 for outputs of unit scale.
    A query seeing one key too many or too few, or padding read as keys, is off by O(1)."""
    if not cpu_decode_kernel.available(dtype):
        pytest.skip(f"this compiler's build of the kernels has no {dtype}")
    query, key, value = _split_qkv(s, len(pads), h_q, h_kv, dim, dtype, seed=dim + s)
    assert s * len(pads) == 1 or not query.is_contiguous()
    scale = dim ** -0.5
    got = cpu_decode_kernel.prefill_attention(query, key, value, pads, scale)
    assert got.shape == (s, len(pads), h_q, dim) and got.dtype == dtype and got.is_contiguous()
    want = _prefill_reference(query, key, value, pads, scale)
    error = float((got.double() - want).abs().max())
    sdpa = torch.empty_like(want)
    for row, pad in enumerate(pads):
        q, k, v = (t[pad:, row].transpose(0, 1)[None] for t in (query, key, value))
        sdpa[pad:, row] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=h_q != h_kv)[0].transpose(0, 1).double()
        sdpa[:pad, row] = want[:pad, row]
    yardstick = float((sdpa - want).abs().max())
    floor = 1e-6 if dtype == torch.float32 else float(torch.finfo(dtype).eps) * float(want.abs().max())
    assert error <= 2 * max(yardstick, floor), (error, yardstick)
    if dtype == torch.float32:
        assert error < 1e-5
    assert torch.equal(got[:pads[0], 0], value[:pads[0], 0].repeat_interleave(h_q // h_kv, 1))


@needs_prefill_kernel
def test_prefill_kernel_without_pads_is_causal_over_every_position():
    query, key, value = _split_qkv(40, 2, 4, 2, 64, torch.float32, seed=3)
    got = cpu_decode_kernel.prefill_attention(query, key, value, None, 0.125)
    torch.testing.assert_close(got.double(), _prefill_reference(query, key, value, [0, 0], 0.125),
                               rtol=0, atol=1e-5)


@needs_prefill_kernel
def test_prefill_kernel_softmax_holds_scores_hundreds_apart():
    """Scores spread over hundreds within each block of 64 keys: most weights underflow to exactly 0 (the
    vector exp's cut below -87) and each block's maximum must be its true one, or a few large weights go
    wrong by O(1). fp32 scores of ~100 carry errors of ~1e-5, so torch's SDPA is the yardstick."""
    query, key, value = _split_qkv(150, 1, 4, 2, 64, torch.float32, seed=6)
    query = query * 12  # scores of std ~24 at scale 1/8: a block's spread ~150
    got = cpu_decode_kernel.prefill_attention(query, key, value, [0], 0.125)
    want = _prefill_reference(query, key, value, [0], 0.125)
    scores = query[:, 0, 0].double() @ key[:, 0, 0].double().T * 0.125
    assert float(scores.max() - scores.min()) > 300
    q, k, v = (t[:, 0].transpose(0, 1)[None] for t in (query, key, value))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=True)
    yardstick = float((sdpa[0].transpose(0, 1).double() - want[:, 0]).abs().max())
    error = float((got.double() - want).abs().max())
    assert error <= 2 * yardstick and error < 1e-4, (error, yardstick)


@needs_prefill_kernel
def test_prefill_kernel_rejects_what_it_cannot_compute():
    query, key, value = _split_qkv(8, 2, 4, 2, 64, torch.float32, seed=4)
    assert not cpu_decode_kernel.prefill_available(torch.float32, 24)
    assert not cpu_decode_kernel.prefill_available(torch.float64, 64)
    with pytest.raises(RuntimeError, match="heads of"):
        cpu_decode_kernel.prefill_attention(query[..., :24], key[..., :24], value[..., :24], None, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        cpu_decode_kernel.prefill_attention(query, key[:, :, :1], value, None, 1.0)
    with pytest.raises(ValueError, match="does not match"):  # 4 query heads over 3 KV heads
        q3, k3, v3 = _split_qkv(8, 2, 4, 3, 64, torch.float32, seed=5)
        cpu_decode_kernel.prefill_attention(q3, k3, v3, None, 1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        cpu_decode_kernel.prefill_attention(query, key.bfloat16(), value, None, 1.0)
    with pytest.raises(ValueError, match="contiguous channels"):
        strided = torch.randn(8, 2, 2, 128)[..., ::2]
        cpu_decode_kernel.prefill_attention(query, strided, strided, None, 1.0)
    for pads in ([0], [0, 8], [-1, 0]):  # one per row, each leaving the row's last position real
        with pytest.raises(ValueError, match="pads"):
            cpu_decode_kernel.prefill_attention(query, key, value, pads, 1.0)


@needs_prefill_kernel
def test_prefill_override_takes_the_kernel_only_where_it_applies(monkeypatch):
    """``cpu_decode.cpu_prefill_attention`` installs the SDPA core's prefill override for its block only, and
    the override answers None (SDPA computes) for another dtype or head size and for prompts longer than the
    kernel measured faster on; each call is counted where it went."""
    from megatron_grm.models import sdpa_attention
    from megatron_grm.parallel import cpu_decode

    query, key, value = _split_qkv(40, 2, 4, 2, 64, torch.float32, seed=6)
    assert sdpa_attention.prefill_attention_override is None
    with cpu_decode.cpu_prefill_attention() as stats:
        attend = sdpa_attention.prefill_attention_override
        got = attend(query, key, value, [0, 3], 0.125)
        torch.testing.assert_close(got, cpu_decode_kernel.prefill_attention(query, key, value, [0, 3], 0.125),
                                   rtol=0, atol=0)
        assert attend(query.double(), key.double(), value.double(), [0, 3], 0.125) is None
        assert attend(query[..., :24], key[..., :24], value[..., :24], [0, 3], 0.125) is None
        monkeypatch.setattr(cpu_decode, "PREFILL_MAX_POSITION_CHANNELS", 38 * 64)
        assert attend(query, key, value, None, 0.125) is None  # 40 real positions in the longest row
        assert attend(query, key, value, [1, 3], 0.125) is None  # 39
        assert attend(query, key, value, [2, 3], 0.125) is not None  # 38
    assert sdpa_attention.prefill_attention_override is None
    assert (stats.kernel, stats.sdpa) == (2, 4)


@needs_prefill_kernel
@pytest.mark.parametrize("amx", [False, True])
def test_a_bf16_prefill_goes_to_sdpa_where_the_cpu_has_amx(monkeypatch, amx):
    """torch's CPU flash attention runs bf16 blocks on AMX tiles, twice the kernel's rate where measured: with
    AMX a bf16 prefill is left to SDPA (None), without it the kernel computes it; fp32 takes the kernel
    either way."""
    from megatron_grm.models import sdpa_attention
    from megatron_grm.parallel import cpu_decode

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cpu_decode.sdpa_prefills_faster(torch.bfloat16) is amx
    assert cpu_decode.sdpa_prefills_faster(torch.float32) is False
    query, key, value = _split_qkv(40, 2, 4, 2, 64, torch.bfloat16, seed=7)
    with cpu_decode.cpu_prefill_attention() as stats:
        attend = sdpa_attention.prefill_attention_override
        got = attend(query, key, value, [0, 3], 0.125)
        assert (got is None) is amx
        if not amx:
            assert torch.equal(got, cpu_decode_kernel.prefill_attention(query, key, value, [0, 3], 0.125))
        assert attend(query.float(), key.float(), value.float(), [0, 3], 0.125) is not None
    assert (stats.kernel, stats.sdpa) == ((1, 1) if amx else (2, 0))
