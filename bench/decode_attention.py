"""One decode step's attention over a KV cache at GRM prompt lengths: torch's path against the C++ kernel
(``parallel/cpu_decode_kernel.py``), and a plain read of the same cache for the memory's rate, side by side.

    python bench/decode_attention.py                      # bench/rollout.py's 21M model: 4 layers, 4 KV heads of 64
    python bench/decode_attention.py --dtype bf16         # a bf16 model's cache
    python bench/decode_attention.py --positions 4096 --kv-heads 8 --rep 4 --dim 128

Each step attends every layer's cache (one per layer, so the step reads from memory as a rollout does,
not from the CPU's caches): ``rows`` queries per KV group's query heads over ``positions`` cached positions
with the first 5% of every row masked as left padding (which the kernel skips and torch's path reads).
Rounds alternate between the variants, wall clock, best round counts. ``read`` reads every byte of the
caches with the C++ read probe (``cpu_decode_kernel.read_probe``; before session 52 torch's sum of the
positions each row sees, which reads ~20% slower here): the memory's rate. GB/s counts the bytes each
variant reads (torch and the kernel: the visible positions; the read: the whole caches).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_grm.parallel import cpu_decode, cpu_decode_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--positions", type=int, default=1230, help="cached positions per row (prompt + generated)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--rep", type=int, default=2, help="query heads per KV head")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's and its cache's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if not cpu_decode_kernel.available(dtype):
        sys.exit(f"the C++ kernel is unavailable here: {cpu_decode_kernel.describe()}")
    g = torch.Generator().manual_seed(0)
    b, h, n, d = args.rows, args.kv_heads, args.positions, args.dim
    caches = [tuple(torch.randn(b, h, n + 64, d, generator=g).to(dtype) for _ in range(2)) for _ in range(args.layers)]
    queries = torch.randn(b, h, args.rep, d, generator=g).to(dtype)
    padding = torch.zeros(b, n + 64, dtype=torch.bool)
    pad = n // 20
    padding[:, :pad] = True
    scale = d ** -0.5

    def torch_path() -> None:
        with _torch_only():
            for keys, values in caches:
                cpu_decode._attend_per_row(queries, keys, values, 0, n, scale)

    def kernel() -> None:
        for keys, values in caches:
            cpu_decode._attend_per_row(queries, keys, values, 0, n, scale)

    def read() -> None:  # every byte of every layer's keys and values, by the C++ read probe: the memory's rate
        for keys, values in caches:
            cpu_decode_kernel.read_probe(keys.view(torch.float32).view(-1))
            cpu_decode_kernel.read_probe(values.view(torch.float32).view(-1))

    with cpu_decode.masked_cache_positions(padding):
        with _torch_only():
            want = cpu_decode._merge_parts([cpu_decode._attend_per_row(queries, *caches[0], 0, n, scale)])
        got = cpu_decode._merge_parts([cpu_decode._attend_per_row(queries, *caches[0], 0, n, scale)])
        variants = {"torch": torch_path, "kernel": kernel, "read": read}
        best = dict.fromkeys(variants, float("inf"))
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    cache_bytes = 2 * args.layers * b * h * (n - pad) * d * caches[0][0].element_size()
    read_bytes = sum(keys.nbytes + values.nbytes for keys, values in caches)
    rate = {name: (read_bytes if name == "read" else cache_bytes) / seconds for name, seconds in best.items()}
    print(f"decode attention: {args.layers} layers, {b} rows x {n} positions, {h} KV heads x {args.rep} query heads "
          f"of {d}, {args.dtype}; visible cache per step {cache_bytes / 1e6:.0f} MB; torch threads "
          f"{torch.get_num_threads()}; {cpu_decode_kernel.describe()}")
    print(f"max |kernel - torch| over one layer's output: {(got - want).abs().max().item():.2e}")
    print(f"{'variant':8s} {'ms/step':>8s} {'GB/s':>6s}")
    for name, seconds in best.items():
        print(f"{name:8s} {seconds * 1e3:8.2f} {rate[name] / 1e9:6.1f}")
    print(f"RATIO torch/kernel {best['torch'] / best['kernel']:.2f}; kernel at {rate['kernel'] / rate['read']:.0%} "
          f"of the read's rate")


@contextlib.contextmanager
def _torch_only():
    """parallel/cpu_decode.py's path where the kernel is unavailable."""
    native = cpu_decode._native
    cpu_decode._native = lambda cache: False
    try:
        yield
    finally:
        cpu_decode._native = native


if __name__ == "__main__":
    main()
