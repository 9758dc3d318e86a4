"""Rollout GEMMs on the CPU: torch's fp32 (or ``--dtype bf16``) matmul against oneDNN on a weight reordered once
(``parallel/onednn_linear.py``) and, in fp32, the C++ GEMM on a weight packed for it
(``parallel/csrc/linear.cpp``), in bf16 on a CPU with AMX the AMX GEMM (``parallel/csrc/amx_linear.cpp``, up to
32 rows) and on a CPU without bf16 arithmetic the GEMMs of the weights' fp32 copies (``widened``: the C++ GEMM or
oneDNN, as a rollout runs them), for the linears of one Llama layer and the output layer, at the row counts of
decode steps and of a prefill, side by side.

    python bench/onednn_linear.py                                  # bench/rollout.py's 21M model: hidden 512
    python bench/onednn_linear.py --hidden 1024 --ffn 2816 --heads 16 --kv-heads 8 --vocab 32000
    python bench/onednn_linear.py --dtype bf16                     # a bf16 model's rollouts (AMX where present)
    python bench/onednn_linear.py --dtype bf16 --rows 32 --evict-mb 200   # each call after a 200 MB read
    OMP_WAIT_POLICY=ACTIVE python bench/onednn_linear.py --hidden 128 --ffn 512 --heads 4 --kv-heads 4 \
        --vocab 256 --rows 1 4 32 128 --clock wall                    # the CPU demo's model (tiny_grm)

Each variant is timed in alternating rounds of ~0.15 s in process CPU seconds (the machine may be shared; idle
OpenMP threads sleep, ``OMP_WAIT_POLICY=PASSIVE`` unless set), or with ``--clock wall`` in wall seconds; the best
round counts. The last column is the one-off cost of reordering that weight, in multiples of one oneDNN call at
that row count. ``RATIO`` lines per row count: matmul / oneDNN and oneDNN / the C++ GEMM over all the GEMMs.
Weights are hot in cache here (each GEMM repeats on one weight); in a decode step they come from memory,
between the attention's reads of the KV cache: ``bench/rollout.py`` times that. ``--evict-mb N`` comes
closer: each call is timed alone (wall clock, median) right after a read of N MB, which leaves the weights,
the code and the data around the call in memory, not in the caches, as a decode step's attention does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads would burn CPU seconds spinning

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from wgrad_gemm import layer_shapes, time_per_call  # one Llama layer's and the output layer's [out, in]

from megatron_grm.parallel import cpu_decode_kernel, onednn_linear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32, 1024],
                   help="rows per GEMM: decode steps of 1 and 32 sequences, a prefill of 1,024 tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and inputs")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="hot loops in process CPU seconds, or in wall seconds (with OMP_WAIT_POLICY=ACTIVE for the "
                        "GEMMs of a few rows on small weights, where a sleeping thread's wake-up is most of a call)")
    p.add_argument("--evict-mb", type=int, default=0,
                   help="time each call alone after reading this many MB (0: hot loops in CPU seconds)")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if not onednn_linear.available(dtype):
        raise SystemExit(f"this torch build has no oneDNN {args.dtype} linear ops (torch.backends.mkldnn)")
    clock = "process CPU time" if args.clock == "cpu" else "wall time"
    print(f"CPU, {torch.get_num_threads()} threads, {args.dtype}; {clock}, best of {args.rounds} alternating rounds "
          f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})")
    kernel = dtype == torch.float32 and cpu_decode_kernel._library() is not None
    amx = dtype == torch.bfloat16 and cpu_decode_kernel.amx_available()
    # A CPU without bf16 arithmetic: a rollout multiplies the bf16 weights' fp32 copies (onednn_linear.widens_bf16)
    widened = dtype == torch.bfloat16 and onednn_linear.gemm_dtype(dtype) is torch.float32
    kernel_rows = cpu_decode_kernel.linear_kernel_rows()
    if widened:
        print(f"this CPU has no bf16 arithmetic: the last column is what a rollout runs, the weights' fp32 copies on "
              f"the C++ GEMM up to {kernel_rows} rows and on oneDNN beyond, the output rounded to bf16")
    elif not kernel and not amx:
        print("no C++ GEMM column: " + (cpu_decode_kernel.describe() if dtype == torch.float32 else
                                        "bf16 takes the AMX GEMM, and this CPU or build has no AMX"))
    column = "AMX GEMM" if amx else "widened" if widened else "C++ GEMM"
    timer = time_per_call if args.clock == "cpu" else _wall_per_call
    rate = "GFLOP/CPU-s" if args.clock == "cpu" else "GFLOP/s"
    if args.evict_mb:
        print(f"each call timed alone after a {args.evict_mb} MB read: wall clock, median of the calls")
        timer = _after_a_read(torch.ones(args.evict_mb * (1 << 20) // 4))
    g = torch.Generator().manual_seed(0)
    for rows in args.rows:
        totals = {"matmul": 0.0, "onednn": 0.0, "kernel": 0.0}
        for name, (n_out, n_in) in layer_shapes(args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab).items():
            weight = torch.randn(n_out, n_in, generator=g).to(dtype)
            x = torch.randn(rows, n_in, generator=g).to(dtype)
            with torch.inference_mode():
                began = time.process_time()
                packed = onednn_linear.reorder(weight, rows)
                reorder_s = time.process_time() - began
                variants = {"matmul": lambda x=x, w=weight: torch.matmul(x, w.t()),  # Megatron's linear
                            "onednn": lambda x=x, w=packed: onednn_linear.linear(x, w)}
                if kernel:
                    panels = cpu_decode_kernel.pack_linear_weight(weight)
                    variants["kernel"] = lambda x=x, w=panels, n=n_out: cpu_decode_kernel.packed_linear(x, w, n)
                elif amx and rows <= cpu_decode_kernel.AMX_ROWS:
                    tiles = cpu_decode_kernel.pack_amx_weight(weight)
                    variants["kernel"] = lambda x=x, w=tiles, n=n_out: cpu_decode_kernel.amx_linear(x, w, n)
                elif widened and rows <= kernel_rows:
                    panels = cpu_decode_kernel.pack_linear_weight(weight.float())
                    variants["kernel"] = lambda x=x, w=panels, n=n_out: cpu_decode_kernel.packed_linear(
                        x.float(), w, n).bfloat16()
                elif widened:
                    wide = onednn_linear.reorder(weight.float(), rows)
                    variants["kernel"] = lambda x=x, w=wide: onednn_linear.linear(x.float(), w).bfloat16()
                calls = calls_per_round(variants["matmul"])
                best = {label: float("inf") for label in variants}
                for _ in range(args.rounds):
                    for label, fn in variants.items():
                        best[label] = min(best[label], timer(fn, calls, cuda=False))
            for label in best:
                totals[label] += best[label]
            has_kernel = "kernel" in best
            gflops = 2 * rows * n_out * n_in / 1e9
            print(f"rows {rows:5d} {name:7s} [{n_out:>6} x {n_in:>5}]  matmul {best['matmul'] * 1e3:8.3f} ms "
                  f"({gflops / best['matmul']:5.1f} {rate})  oneDNN {best['onednn'] * 1e3:8.3f} ms "
                  f"({gflops / best['onednn']:5.1f})  ratio {best['matmul'] / best['onednn']:.2f}  "
                  f"reorder {reorder_s / best['onednn']:.1f} calls" + (
                      f"  {column} {best['kernel'] * 1e3:8.3f} ms "
                      f"({gflops / best['kernel']:5.1f})"
                      f"  oneDNN/it {best['onednn'] / best['kernel']:.2f}" if has_kernel else ""))
        print(f"RATIO matmul/oneDNN at {rows} rows over one layer and the output layer = "
              f"{totals['matmul'] / totals['onednn']:.3f} "
              f"({totals['matmul'] * 1e3:.3f} vs {totals['onednn'] * 1e3:.3f} ms)")
        if totals["kernel"]:
            print(f"RATIO oneDNN/{column} at {rows} rows over one layer and the output layer = "
                  f"{totals['onednn'] / totals['kernel']:.3f} "
                  f"({totals['onednn'] * 1e3:.3f} vs {totals['kernel'] * 1e3:.3f} ms)")


def _wall_per_call(fn, calls: int, cuda: bool = False) -> float:
    for _ in range(2):
        fn()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls


def calls_per_round(fn, seconds: float = 0.15, clock=time.perf_counter) -> int:
    """Calls that take about ``seconds`` of wall time: >= 0.1 s a round, as the kernel accounts other threads'
    CPU time only at its ticks. Sized by timing the calls, not by FLOPs, since a GEMM of a few rows on a small
    weight is a few microseconds of call overhead (a FLOP-sized round of those ran for minutes). The probe that
    sizes it is timed three times and the fastest kept: one preemption by another process would otherwise
    shrink every round after it."""
    def took(calls: int) -> float:
        began = clock()
        for _ in range(calls):
            fn()
        return clock() - began

    calls = 1
    while took(calls) < seconds / 8:
        calls *= 4
    fastest = min(took(calls) for _ in range(3))
    return max(3, round(calls * seconds / fastest))


def _after_a_read(buffer: torch.Tensor):
    """A timer like ``time_per_call`` whose calls each run alone right after a pass over ``buffer``."""
    def timer(fn, calls: int, cuda: bool = False) -> float:
        times = []
        for _ in range(max(5, min(calls, 25))):
            buffer.sum()
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return sorted(times)[len(times) // 2]

    return timer


if __name__ == "__main__":
    main()
