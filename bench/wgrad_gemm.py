"""Weight-gradient GEMMs accumulated into ``main_grad``: Megatron's unfused path (the gradient as its own
tensor, then added into ``main_grad`` by DDP's hook) against ``parallel/wgrad_gemm.py`` (one GEMM with
beta 1 into ``main_grad``), for the linears of one Llama layer and the output layer, side by side.

    python bench/wgrad_gemm.py                    # CUDA: bf16 operands, fp32 main_grad, 0.89B shape, 8,192 tokens
    python bench/wgrad_gemm.py --tokens 1024      # CPU: fp32, the 156M shape of bench/train_step.py

On a GPU the unfused gradient is a bf16 tensor (rounded before it is summed in fp32); the fused GEMM
accumulates in fp32 into ``main_grad`` (cuBLAS's mixed-precision GEMM, as apex's kernel). Each variant is
timed in alternating rounds (CUDA events on a GPU, process CPU time on CPU); the best round counts.
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

from megatron_grm.parallel.wgrad_gemm import wgrad_gemm_accum_fp32


def layer_shapes(hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each weight whose gradient a Llama layer (and the output layer) computes."""
    head_dim = hidden // heads
    return {"qkv": (hidden + 2 * kv_heads * head_dim, hidden), "proj": (hidden, hidden), "fc1": (2 * ffn, hidden),
            "fc2": (hidden, ffn), "output": (vocab, hidden)}


def accumulations(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> dict:
    """The two ways to add ``grad_output^T @ total_input`` into ``main_grad``."""
    return {
        "unfused": lambda: main_grad.add_(grad_output.t() @ total_input),  # .grad, then DDP's hook adds it
        "fused": lambda: wgrad_gemm_accum_fp32(total_input, grad_output, main_grad),
    }


def time_per_call(fn, calls: int, cuda: bool) -> float:
    """Seconds per call: CUDA events on a GPU, process CPU time on CPU."""
    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    began = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - began) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="rows of the GEMM (8192 on CUDA, 1024 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="2048 on CUDA, 1024 on CPU")
    p.add_argument("--ffn", type=int, default=None, help="5632 on CUDA, 2816 on CPU")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="8 on CUDA, 4 on CPU")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--calls", type=int, default=None, help="calls per timed round (20 on CUDA, 3 on CPU)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    gpu = {"tokens": 8192, "hidden": 2048, "ffn": 5632, "kv_heads": 8, "calls": 20}
    cpu = {"tokens": 1024, "hidden": 1024, "ffn": 2816, "kv_heads": 4, "calls": 3}
    for key, value in (gpu if cuda else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}: operands {str(dtype)[6:]}, main_grad fp32, {args.tokens} tokens, "
          f"{'CUDA events' if cuda else 'process CPU time'}, best of {args.rounds} rounds of {args.calls} calls")

    totals = {"unfused": 0.0, "fused": 0.0}
    for name, (n_out, n_in) in layer_shapes(args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab).items():
        total_input = torch.randn(args.tokens, n_in, device=device, dtype=dtype)
        grad_output = torch.randn(args.tokens, n_out, device=device, dtype=dtype)
        main_grad = torch.zeros(n_out, n_in, device=device)
        variants = accumulations(total_input, grad_output, main_grad)
        best = {label: float("inf") for label in variants}
        for _ in range(args.rounds):
            for label, fn in variants.items():
                best[label] = min(best[label], time_per_call(fn, args.calls, cuda))
        for label in totals:
            totals[label] += best[label]
        tflops = 2 * args.tokens * n_out * n_in / best["fused"] / 1e12
        print(f"{name:7s} [{n_out:>6} x {n_in:>5}]  unfused {best['unfused'] * 1e3:8.3f} ms  "
              f"fused {best['fused'] * 1e3:8.3f} ms  ratio {best['unfused'] / best['fused']:.3f}  "
              f"(fused {tflops:.3g} TFLOP/s)")
    print(f"RATIO unfused/fused over one layer and the output layer = {totals['unfused'] / totals['fused']:.3f} "
          f"({totals['unfused'] * 1e3:.3f} vs {totals['fused'] * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
