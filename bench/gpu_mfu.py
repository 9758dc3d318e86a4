"""Single-GPU training TFLOP/s and MFU of a 1-3B Llama-style model on the Transformer Engine spec, bf16 and FP8.

    python bench/gpu_mfu.py                         # 1.5B (Llama-3.2-1B shape, untied), bf16 then FP8 (~43 GiB)
    python bench/gpu_mfu.py --model 3b              # 3.6B (Llama-3.2-3B shape): H200, or add --micro-batch 1
                                                    #   --recompute full on an 80 GB GPU
    python bench/gpu_mfu.py --precisions bf16       # an A100: FP8 needs compute capability >= 8.9

On a machine without CUDA it logs one line and exits 0. It starts itself under ``torchrun
--nproc-per-node 1``, builds the model through the provider with ``use_te=True`` (the local spec, with a
warning, when Transformer Engine is absent), runs our Trainer on synthetic tokens (causal flash/fused
attention: no explicit mask) and reports tokens/s, model TFLOP/s (``ModelConfig.flops_per_token``),
MFU against the GPU's dense peak, the same run against a measured bf16 matmul, and peak memory next to
what ``megatron_grm.plan`` predicts for this configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from megatron_grm.models.config import ModelConfig

log = logging.getLogger("bench.gpu_mfu")

# Dense (no sparsity) peak TFLOP/s by device name fragment: (bf16, fp8). SXM parts; PCIe/NVL are lower.
PEAK_TFLOPS = {
    "H200": (989.4, 1978.9),
    "H100": (989.4, 1978.9),
    "GH200": (989.4, 1978.9),
    "A100": (312.0, None),
    "L40S": (362.1, 733.0),
}

MODELS = {
    # Llama-3.2-1B's and -3B's shapes with untied embeddings: 1.50B and 3.61B parameters.
    "1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
               vocab_size=128256, rotary_base=500000.0),
    "3b": dict(num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24, num_query_groups=8,
               vocab_size=128256, rotary_base=500000.0),
}


def peak_for(name: str) -> tuple[float | None, float | None]:
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks
    return None, None


def run_config(model: ModelConfig, args: argparse.Namespace, precision: str, run_dir: str) -> dict[str, Any]:
    from megatron_grm.stages.common import load_config

    base = load_config("sft", ["cluster=h200_1gpu"])
    cluster = {**base["cluster"], "name": "this_gpu", "gpu": torch.cuda.get_device_name(),
               "compute_capability": list(torch.cuda.get_device_capability()),
               "memory_gb_per_device": torch.cuda.get_device_properties(0).total_memory / 1024**3}
    return {
        "model": model.to_dict(),
        "parallel": {"tensor_parallel": 1, "pipeline_parallel": 1, "context_parallel": 1, "sequence_parallel": False},
        "precision": {"params_dtype": "bf16", "fp8": "hybrid" if precision == "fp8" else None},
        "cluster": cluster,
        "trainer": {**base["trainer"], "micro_batch_size": args.micro_batch,
                    "global_batch_size": args.micro_batch * args.microbatches, "seq_length": args.seq,
                    "recompute": args.recompute, "run_dir": run_dir, "max_steps": args.steps + args.warmup},
        "optimizer": {**base["optimizer"], "lr": 1e-5, "min_lr": 1e-5, "warmup_steps": 0, "decay_style": "constant"},
        "plan": {"stage": "sft", "kernels": "te"},
    }


def bench_precision(model: ModelConfig, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """Build, warm up and time one precision; frees the GPU afterwards."""
    from train_step import synthetic_batch

    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel.device import have_transformer_engine
    from megatron_grm.plan import make_plan
    from megatron_grm.stages.common import prepare_run
    from megatron_grm.stages.sft import SupervisedObjective
    from megatron_grm.train.loop import Trainer

    use_te = have_transformer_engine()
    if not use_te:
        if precision == "fp8":
            return {"precision": precision, "skipped": "Transformer Engine is not installed (FP8 needs it)"}
        log.warning("Transformer Engine is not installed: measuring the Megatron-Core local spec instead")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = run_config(model, args, precision, run_dir)
        try:
            run = prepare_run(cfg)
        except ValueError as err:  # e.g. FP8 on an A100: a config error, reported and skipped
            return {"precision": precision, "skipped": str(err)}
        plan = make_plan(dict(cfg, plan={**cfg["plan"], "kernels": "te" if use_te else "local"}))
        if not plan.fits:  # e.g. --model 3b at micro-batch 2 on an 80 GB GPU
            return {"precision": precision, "skipped": f"the planner says it {plan.refusal()}"}
        torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(run, model=build_model(run.model, run.parallel, run.precision, run.trainer.recompute,
                                                 use_te=use_te, wgrad_fusion=True))
        objective = SupervisedObjective(run.trainer.loss_tokens_only)
        dev = torch.device("cuda", torch.cuda.current_device())
        seconds = []
        for step in range(args.warmup + args.steps):
            batches = [synthetic_batch(model.vocab_size, args.micro_batch, args.seq, seed=100 * step + i,
                                       device=dev, with_mask=False) for i in range(args.microbatches)]
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = trainer.train_step(batches, objective)
            torch.cuda.synchronize()
            if step >= args.warmup:
                seconds.append(time.perf_counter() - start)
        peak_mem = torch.cuda.max_memory_allocated()
        del trainer
    gc.collect()
    torch.cuda.empty_cache()
    tokens = args.micro_batch * args.microbatches * args.seq
    tflops = model.flops_per_token(args.seq) * tokens / statistics.median(seconds) / 1e12
    bf16_peak, fp8_peak = peak_for(torch.cuda.get_device_name())
    peak = args.peak_tflops or (fp8_peak if precision == "fp8" else bf16_peak)
    return {
        "precision": precision, "spec": "transformer_engine" if use_te else "local",
        "step_s": statistics.median(seconds), "tokens_per_s": tokens / statistics.median(seconds),
        "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None,
        "mfu_vs_bf16_peak": tflops / bf16_peak if bf16_peak else None, "last_loss": result.loss,
        "peak_memory_gib": peak_mem / 1024**3, "planned_peak_gib": plan.worst.training / 1024**3,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from train_step import matmul_gflops

    model = ModelConfig(family="llama", max_position_embeddings=max(args.seq, 8192), norm_epsilon=1e-5,
                        tie_word_embeddings=False, **MODELS[args.model])
    matmul = matmul_gflops(8192, seconds=2.0, dtype=torch.bfloat16, device="cuda") / 1e3
    results = [bench_precision(model, args, p) for p in args.precisions]
    for r in results:
        if "tflops" in r:
            r["mfu_vs_measured_bf16_matmul"] = r["tflops"] / matmul
    return {
        "bench": "gpu_mfu", "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": torch.cuda.get_device_name(),
        "model": args.model, "params": model.num_parameters(), "seq": args.seq, "micro_batch": args.micro_batch,
        "microbatches": args.microbatches, "recompute": args.recompute,
        "measured_bf16_matmul_tflops": matmul, "results": results,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="1b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--recompute", choices=("selective", "full"), default=None)
    p.add_argument("--precisions", nargs="+", choices=("bf16", "fp8"), default=["bf16", "fp8"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the dense peak of this GPU")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        log.info("no CUDA device: skipping the GPU MFU benchmark (run it on an H100/H200, or an A100 for bf16)")
        return 0
    if "RANK" not in os.environ:  # one torchrun worker: the Trainer needs a process group
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                                os.path.abspath(__file__), *argv])
    args = parse_args(argv)
    summary = measure(args)
    print(json.dumps(summary, indent=1))
    for r in summary["results"]:
        if "skipped" in r:
            print(f"{r['precision']}: skipped — {r['skipped']}")
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (unknown GPU peak; pass --peak-tflops)"
            print(f"{r['precision']} ({r['spec']}): {r['tflops']:.0f} TFLOP/s, MFU {mfu}, "
                  f"{r['tokens_per_s']:.0f} tokens/s, peak memory {r['peak_memory_gib']:.1f} GiB "
                  f"(planned {r['planned_peak_gib']:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
