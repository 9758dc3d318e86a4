"""A rollout prefill's causal attention at GRM prompt lengths: torch's SDPA row by row (the local spec's
path, ``models/sdpa_attention.attend_left_padded``) against the C++ kernel
(``parallel/cpu_decode_kernel.prefill_attention``), side by side.

    python bench/prefill_attention.py                   # bench/rollout.py's model: 8 query heads over 4 KV heads of 64
    python bench/prefill_attention.py --dtype bf16      # a bf16 model's prefill
    python bench/prefill_attention.py --heads 32 --kv-heads 8 --dim 128 --rows 4

One layer's attention over ``rows`` left-padded prompts of ``min-prompt``..``max-prompt`` tokens (spread
evenly, the longest setting the width), in Megatron's ``[positions, rows, heads, dim]`` layout, with each
variant's result in the layout the layer takes next. Rounds alternate between the variants, wall clock,
best round counts. GFLOP/s counts the causal work on the real tokens (4 * heads * dim * n(n+1)/2 a row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_grm.models.sdpa_attention import attend_left_padded
from megatron_grm.parallel import cpu_decode_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8, help="prompts prefilled together (a length group of a wave)")
    p.add_argument("--min-prompt", type=int, default=960)
    p.add_argument("--max-prompt", type=int, default=1200)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if not cpu_decode_kernel.prefill_available(dtype, args.dim):
        sys.exit(f"the C++ prefill kernel is unavailable here for {args.dtype} heads of {args.dim}: "
                 f"{cpu_decode_kernel.describe()}; it needs AVX-512 or AVX2 and heads of "
                 f"{cpu_decode_kernel.PREFILL_DIMS}")
    b, h_q, h_kv, d = args.rows, args.heads, args.kv_heads, args.dim
    lengths = torch.linspace(args.max_prompt, args.min_prompt, b).round().long().tolist()
    s = lengths[0]
    pads = [s - n for n in lengths]
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(s, b, h_q + 2 * h_kv, d, generator=g).to(dtype)  # Megatron's QKV split: views
    query, key, value = fused[:, :, :h_q], fused[:, :, h_q:h_q + h_kv], fused[:, :, h_q + h_kv:]
    scale = d ** -0.5

    def sdpa() -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = attend_left_padded(q, k, v, pads, scale=scale, enable_gqa=h_q != h_kv)
        return out.permute(2, 0, 1, 3).reshape(s, b, h_q * d)

    def kernel() -> torch.Tensor:
        return cpu_decode_kernel.prefill_attention(query, key, value, pads, scale).reshape(s, b, h_q * d)

    variants = {"sdpa": sdpa, "kernel": kernel}
    difference = (sdpa().float() - kernel().float()).abs().max().item()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    flops = sum(4 * h_q * d * n * (n + 1) / 2 for n in lengths)
    print(f"prefill attention: {b} rows of {min(lengths)}-{max(lengths)} tokens, {h_q} query heads over {h_kv} KV "
          f"heads of {d}, {args.dtype}; torch threads {torch.get_num_threads()}; {cpu_decode_kernel.describe()}")
    print(f"max |kernel - sdpa| over the output: {difference:.2e}")
    print(f"{'variant':8s} {'ms':>8s} {'GFLOP/s':>8s}")
    for name, seconds in best.items():
        print(f"{name:8s} {seconds * 1e3:8.1f} {flops / seconds / 1e9:8.1f}")
    print(f"RATIO sdpa/kernel {best['sdpa'] / best['kernel']:.2f}")


if __name__ == "__main__":
    main()
