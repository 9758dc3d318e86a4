"""Training-step throughput: our Megatron-Core trainer vs. `transformers` + torch AdamW, side by side.

    python bench/train_step.py                      # CPU: Llama-style, hidden 1024, 8 layers, fp32
    python bench/train_step.py --clock cpu          # a shared, loaded CPU: time in process CPU seconds
    python bench/train_step.py --profile            # then: where each side's time goes, by op category
    python bench/train_step.py --dtype bf16         # on a GPU (cuda path; TE spec when installed)
    python bench/train_step.py --seq 1024 --response-tokens 256   # RFT-shaped: loss on the judgment only

It starts itself again under ``torchrun --nproc-per-node 1`` (the Megatron side needs a process group).
Both models hold the same weights (the HF model is converted with ``megatron_grm.models.hf_convert``),
see the same token batches and take the same optimizer step (Adam, clip 1.0), and their steps alternate
so that load from other processes on the machine hits both sides alike. Each round also times a large
fp32 ``torch.matmul``. Headline figures use each side's best step (the least disturbed by other
processes); MFU is that step's model FLOP/s over the best matmul probe. Paired per-round ratios and
medians are in the JSON too.

``--response-tokens N`` puts the loss on each sequence's last N tokens only, as RFT/SFT on a judgment
does: HF gets ``labels=-100`` on the prompt (TRL's completion-only loss) and ``logits_to_keep=N + 1`` (its
own way to project only the positions the loss reads; the labels are cut alike), our trainer projects only
the N (``trainer.loss_tokens_only``). ``--no-loss-tokens-only`` switches both off, and
``--no-hf-logits-to-keep`` HF's alone. FLOPs for MFU count the output layer at the loss tokens only.

Prints one line per round and a final JSON summary (``--json`` writes it to a file too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_grm.models.config import ModelConfig
from megatron_grm.parallel.cpu_compat import without_cpu_compat

log = logging.getLogger("bench.train_step")


# ------------------------------------------------------------------------------------------ shared pieces
def bench_model(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        family="llama", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 2048), rotary_base=10000.0, norm_epsilon=1e-5,
        tie_word_embeddings=False,
    )


def run_config(model: ModelConfig, args: argparse.Namespace, run_dir: str, precision: dict[str, Any],
               cluster: str = "local_cpu") -> dict[str, Any]:
    """The RunConfig dict a stage would compose, for one process and synthetic data."""
    from megatron_grm.stages.common import load_config

    base = load_config("sft", [f"cluster={cluster}"])
    return {
        "model": model.to_dict(),
        "parallel": {"tensor_parallel": 1, "pipeline_parallel": 1, "context_parallel": 1,
                     "sequence_parallel": False},
        "precision": precision,
        "cluster": base["cluster"],
        "trainer": {**base["trainer"], "micro_batch_size": args.batch,
                    "global_batch_size": args.batch * args.microbatches, "seq_length": args.seq,
                    "max_steps": args.steps + args.warmup, "run_dir": run_dir, "recompute": args.recompute,
                    "loss_tokens_only": args.loss_tokens_only, "lazy_grad_zeroing": args.lazy_grad_zeroing},
        "optimizer": {**base["optimizer"], "lr": 1e-5, "min_lr": 1e-5, "warmup_steps": 0,
                      "decay_style": "constant", "use_distributed_optimizer": args.distributed_optimizer,
                      "fused_kernel": args.fused_adam},
    }


def synthetic_batch(vocab: int, batch: int, seq: int, seed: int, device: torch.device,
                    with_mask: bool = True, response_tokens: int = 0) -> dict[str, torch.Tensor]:
    """The trainer's batch contract (see data/packing.py) for one row of random tokens per sample, plus
    ``hf_labels`` (HF shifts them itself; -100 = no loss). ``response_tokens``: loss on the last N only."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, -1] = 0.0  # the last position has no next token: same s-1 targets as HF's internal shift
    hf_labels = tokens.clone()
    if response_tokens:
        loss_mask[:, : seq - 1 - response_tokens] = 0.0  # positions predicting the prompt's tokens
        hf_labels[:, : seq - response_tokens] = -100
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "hf_labels": hf_labels,
           "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}
    if with_mask:
        out["attention_mask"] = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None].expand(batch, 1, seq, seq)
    return {k: v.to(device) for k, v in out.items()}


def matmul_gflops(n: int = 2048, seconds: float = 0.6, dtype: torch.dtype = torch.float32,
                  device: str = "cpu", clock=time.perf_counter) -> float:
    """Best-of GFLOP/s of an n×n×n matmul: the machine's practical peak right now (same load as the step)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = clock()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / max(clock() - t, 1e-9) / 1e9)
    return best


# ------------------------------------------------------------------------------------------ the two sides
def build_hf(model: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int):
    """transformers' LlamaForCausalLM with its default attention (SDPA) and the same architecture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon, rope_theta=model.rotary_base, tie_word_embeddings=False,
        initializer_range=model.init_method_std,
    )
    return LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).train()


def copy_hf_into_megatron(hf_model, raw_model) -> str:
    """Give the Megatron model the HF model's weights via the project's converter; say what happened."""
    try:
        from megatron_grm.models.hf_convert import fill_model_from_hf, open_hf
    except ImportError as exc:
        return f"random init on both sides (converter unavailable: {exc})"
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder, safe_serialization=True)
        src = open_hf(folder)
        src.cfg.vocab_size = hf_model.config.vocab_size
        fill_model_from_hf(raw_model, src)
    return "same weights (HF model converted with megatron_grm.models.hf_convert)"


@dataclass
class Side:
    """One contender: a step function, the clock it is timed with, and the timings it produced."""

    name: str
    clock: Any = time.perf_counter
    step: Any = None
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)  # per timed step
    current: dict[str, float] = field(default_factory=dict)  # the step in progress

    @contextlib.contextmanager
    def phase(self, label: str):
        """Time a part of the step on this side's clock (on a GPU: what it launched, synchronised), and
        label it for the profiler."""
        from torch.profiler import record_function

        _sync_cuda()
        start = self.clock()
        with record_function(f"phase: {label}"):
            yield
        _sync_cuda()
        self.current[label] = self.current.get(label, 0.0) + self.clock() - start

    def close_step(self, timed: bool) -> None:
        if timed:
            for label, seconds in self.current.items():
                self.phases.setdefault(label, []).append(seconds)
        self.current = {}


def megatron_side(args: argparse.Namespace, model: ModelConfig, hf_model, run_dir: str, clock) -> tuple[Side, str]:
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel import onednn_training
    from megatron_grm.stages.common import prepare_run
    from megatron_grm.stages.sft import SupervisedObjective
    from megatron_grm.train.loop import Trainer

    precision = {"params_dtype": args.dtype, "fp8": args.fp8}
    cluster = "h200_1gpu" if torch.cuda.is_available() else "local_cpu"
    if args.onednn_forward is not None:  # else init_parallel (in prepare_run) picks for this CPU, as in training
        os.environ[onednn_training.FORWARD_VARIABLE] = "1" if args.onednn_forward else "0"
    if args.widen_bf16 is not None:
        os.environ[onednn_training.WIDEN_VARIABLE] = "1" if args.widen_bf16 else "0"
    run = prepare_run(run_config(model, args, run_dir, precision, cluster))
    raw = build_model(run.model, run.parallel, run.precision, run.trainer.recompute, wgrad_fusion=args.wgrad_fusion)
    weights = copy_hf_into_megatron(hf_model, raw)
    trainer = Trainer(run, model=raw)
    side = Side("megatron", clock)
    wrap_phases(trainer, side)
    objective = SupervisedObjective(run.trainer.loss_tokens_only)

    def step(batches: list[dict[str, torch.Tensor]]) -> float:
        return trainer.train_step(batches, objective).loss

    side.step = step
    return side, weights


def hf_side(hf_model, clip: float, clock, adamw: str = "fused", logits_to_keep: int = 0) -> Side:
    """HF's usual loop: loss from the model, backward, clip, torch AdamW. ``fused`` is the kernel HF's
    Trainer picks by default on torch >= 2.8 (``optim="adamw_torch_fused"``); ``foreach`` is what a bare
    ``torch.optim.AdamW(...)`` gets. ``logits_to_keep`` > 0: project only the last that many positions
    (the loss's, with the one before its first target) and cut the labels alike."""
    opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            fused=adamw == "fused", foreach=adamw == "foreach")
    side = Side("transformers", clock)

    def step(batches: list[dict[str, torch.Tensor]]) -> float:
        with side.phase("zero grads"):
            opt.zero_grad(set_to_none=True)
        total, count = 0.0, sum(float(b["loss_mask"].sum()) for b in batches)
        with side.phase("forward+backward"):
            for b in batches:
                if logits_to_keep:
                    out = hf_model(input_ids=b["tokens"], labels=b["hf_labels"][:, -logits_to_keep:],
                                   logits_to_keep=logits_to_keep)
                else:
                    out = hf_model(input_ids=b["tokens"], labels=b["hf_labels"])
                # HF averages over this micro-batch's targets; weight it to the step's token mean.
                (out.loss * (float(b["loss_mask"].sum()) / count)).backward()
                total += float(out.loss.detach()) * float(b["loss_mask"].sum())
        with side.phase("optimizer step (clip, Adam, param sync)"):
            torch.nn.utils.clip_grad_norm_(hf_model.parameters(), clip)
            opt.step()
        return total / count

    side.step = step
    return side


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ where time goes
CATEGORIES = (  # aten op name fragments -> what they are, checked in order
    ("attention core", ("baddbmm", "bmm", "softmax", "masked_fill", "scaled_dot_product")),
    ("matmul (GEMM)", ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")),
    ("copies / layout", ("copy_", "aten::cat", "index_select", "clone", "contiguous", "repeat_interleave")),
    ("fills / zeroing", ("fill_", "zero_")),
    ("norms / SwiGLU / RoPE (C++ passes)", ("KernelRMSNorm", "KernelSwiGLU", "KernelRoPE")),
    ("collectives (1 rank)", ("gloo", "c10d", "all_reduce", "allreduce", "broadcast", "all_gather", "reduce_scatter")),
)


# Our trainer's forward GEMMs may run as oneDNN's op (parallel/onednn_training.py), outside aten's namespace, and
# on CPU its norms, SwiGLUs and RoPE as autograd functions calling C++ (parallel/elementwise_autograd.py).
OP_NAMESPACES = ("aten::", "mkldnn::", "KernelRMSNorm", "KernelSwiGLU", "KernelRoPE")


def _category(name: str) -> str:
    for label, fragments in CATEGORIES:
        if any(f in name for f in fragments):
            return label
    return "other ops (elementwise, norms, loss, Adam math)"


def wrap_phases(trainer, side: Side) -> None:
    """Time and label the trainer's phases without touching the trainer's code (instance attributes)."""
    def timed(label, fn):
        def call(*a, **k):
            with side.phase(label):
                return fn(*a, **k)
        return call

    trainer.model.zero_grad_buffer = timed("zero grads", trainer.model.zero_grad_buffer)
    trainer.forward_backward = timed("forward+backward", trainer.forward_backward)
    trainer.optimizer.step = timed("optimizer step (clip, Adam, param sync)", trainer.optimizer.step)


def profile_sides(sides: list[Side], batches, repeats: int = 2,
                  top: int = 12) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Seconds per op category and per labelled phase, the smallest of ``repeats`` profiled steps; and
    each side's ``top`` aten ops by self time in its first profiled step."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, dict[str, float]] = {}
    top_ops: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for side in sides:
            with without_cpu_compat() if side.name == "transformers" else contextlib.nullcontext():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    side.step(batches)
            side.close_step(timed=False)
            cats: dict[str, float] = {}
            for ev in prof.key_averages():
                if ev.key.startswith("Optimizer.step#"):
                    cats[ev.key] = ev.cpu_time_total / 1e6
                elif ev.key.startswith(OP_NAMESPACES) or "gloo" in ev.key or "c10d" in ev.key:
                    label = _category(ev.key)
                    cats[label] = cats.get(label, 0.0) + ev.self_cpu_time_total / 1e6
            mine = out.setdefault(side.name, {})
            for k, v in cats.items():
                mine[k] = min(mine.get(k, v), v)
            ops = sorted((ev for ev in prof.key_averages() if ev.key.startswith(OP_NAMESPACES)),
                         key=lambda ev: -ev.self_cpu_time_total)[:top]
            top_ops.setdefault(side.name, {ev.key: round(ev.self_cpu_time_total / 1e6, 3) for ev in ops})
    return out, top_ops


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    """Rows = union of keys, one column per side."""
    names = sorted({k for side in table.values() for k in side})
    print(f"{title:<52}" + "".join(f"{s:>14}" for s in table))
    for k in names:
        print(f"{k:<52}" + "".join(f"{table[s].get(k, 0.0):>14.3f}" for s in table))


# ------------------------------------------------------------------------------------------ the run
def measure(args: argparse.Namespace) -> dict[str, Any]:
    from megatron_grm.parallel import onednn_training
    from megatron_grm.parallel.device import device as run_device

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    # CPU time of this process (all its threads) does not count the time other processes hold the cores.
    clock = time.process_time if args.clock == "cpu" and not torch.cuda.is_available() else time.perf_counter
    model = bench_model(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as run_dir:
        hf_model = build_hf(model, torch.float32, torch.device("cpu"), args.seed)
        megatron, weights = megatron_side(args, model, hf_model, run_dir, clock)
        dev = run_device()
        hf = hf_side(hf_model.to(device=dev, dtype=dtype), clip=1.0, clock=clock, adamw=args.hf_adamw,
                     logits_to_keep=hf_logits_to_keep(args))
        peak_dtype = torch.float32 if dev.type == "cpu" else dtype
        tokens = args.batch * args.microbatches * args.seq
        flops_per_token = useful_flops_per_token(model, args.seq, args.response_tokens)
        peaks: list[float] = []
        for r in range(args.warmup + args.steps):
            batches = [synthetic_batch(model.vocab_size, args.batch, args.seq, seed=1000 * r + i, device=dev,
                                       with_mask=dev.type == "cpu", response_tokens=args.response_tokens)
                       for i in range(args.microbatches)]
            peak = matmul_gflops(args.matmul_n, dtype=peak_dtype, device=dev.type, clock=clock)
            for side in (megatron, hf) if r % 2 == 0 else (hf, megatron):
                _sync(dev)
                start = clock()
                with without_cpu_compat() if side is hf else contextlib.nullcontext():
                    loss = side.step(batches)
                _sync(dev)
                if r >= args.warmup:
                    side.seconds.append(clock() - start)
                side.close_step(timed=r >= args.warmup)
                side.losses.append(loss)
            if r >= args.warmup:
                peaks.append(peak)
                print(f"round {r - args.warmup + 1}/{args.steps}: megatron {megatron.seconds[-1]:.2f}s "
                      f"transformers {hf.seconds[-1]:.2f}s  matmul peak {peak:.1f} GFLOP/s "
                      f"loss {megatron.losses[-1]:.4f} / {hf.losses[-1]:.4f}", flush=True)
        summary = summarise(args, model, weights, megatron, hf, peaks, tokens, flops_per_token, dev)
        summary["load_avg_1m"] = [load_at_start, os.getloadavg()[0]]  # other processes on this machine
        summary["megatron_forward_gemm"] = ("oneDNN" if onednn_training.installed()
                                            else "torch matmul" if dev.type == "cpu" else "Megatron's")
        if dev.type == "cpu" and args.dtype == "bf16":
            summary["megatron_forward_gemm"] += (", bf16 layers' GEMMs on fp32 copies" if onednn_training.widening()
                                                 else ", bf16 layers' GEMMs in bf16")
        if args.profile:
            summary["profile"], summary["profile_top_ops"] = profile_sides([megatron, hf], batches)
            print_table("profiler: wall s per step by op (best of 2)", summary["profile"])
    return summary


def hf_logits_to_keep(args: argparse.Namespace) -> int:
    """Positions HF projects onto the vocabulary (0: all): the loss's, when ours projects only those too."""
    if args.response_tokens and args.loss_tokens_only and args.hf_logits_to_keep:
        return args.response_tokens + 1
    return 0


def useful_flops_per_token(model: ModelConfig, seq: int, response_tokens: int) -> float:
    """Training FLOPs per token of the work the loss needs: the decoder at every position, the output
    layer (``3 x 2 x hidden x vocab``) only at the loss's share of them when ``response_tokens`` is set."""
    full = model.flops_per_token(seq)
    if not response_tokens:
        return full
    return full - 3.0 * 2 * model.hidden_size * model.vocab_size * (1.0 - response_tokens / seq)


def summarise(args, model: ModelConfig, weights: str, megatron: Side, hf: Side, peaks: list[float], tokens: int,
              flops_per_token: float, dev: torch.device) -> dict[str, Any]:
    """Best and median step per side. Other processes share this machine, so the best step (the least
    disturbed one, as ``timeit`` does) is the headline; MFU puts it over the best matmul probe."""
    def per_side(side: Side) -> dict[str, float]:
        best, median = min(side.seconds), statistics.median(side.seconds)
        return {
            "step_s_best": best, "step_s_median": median,
            "tokens_per_s": tokens / best, "tokens_per_s_median": tokens / median,
            "gflops": tokens * flops_per_token / best / 1e9,
            "mfu_vs_matmul": tokens * flops_per_token / best / 1e9 / max(peaks),
            "first_loss": side.losses[0],
            "phases_s_best": {k: min(v) for k, v in side.phases.items()},
        }

    m, h = per_side(megatron), per_side(hf)
    paired = [hs / ms for ms, hs in zip(megatron.seconds, hf.seconds)]  # steps adjacent in time: same load
    return {
        "bench": "train_step", "date": time.strftime("%Y-%m-%d %H:%M"), "device": str(dev),
        "threads": torch.get_num_threads(),
        "model": {k: getattr(model, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                 "num_attention_heads", "num_query_groups", "vocab_size")},
        "params": model.num_parameters(), "batch": args.batch, "microbatches": args.microbatches, "seq": args.seq,
        "dtype": args.dtype, "recompute": args.recompute, "clock": args.clock,
        "distributed_optimizer": args.distributed_optimizer, "fused_adam": args.fused_adam,
        "hf_adamw": args.hf_adamw, "response_tokens": args.response_tokens,
        "loss_tokens_only": args.loss_tokens_only, "hf_logits_to_keep": hf_logits_to_keep(args),
        "precision": {"megatron": f"{args.dtype}" + (f" + fp8 {args.fp8}" if args.fp8 else ""),
                      "transformers": args.dtype},
        "weights": weights, "matmul_peak_gflops": max(peaks), "matmul_probes_gflops": peaks,
        "megatron": m, "transformers": h,
        "ratio_tokens_per_s": m["tokens_per_s"] / h["tokens_per_s"],
        "ratio_paired_median": statistics.median(paired), "ratio_per_round": paired,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="micro-batch size")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="fp32 on CPU, bf16 on CUDA by default")
    p.add_argument("--fp8", choices=("hybrid", "e4m3"), default=None, help="Megatron side only (Hopper+)")
    p.add_argument("--recompute", choices=("selective", "full"), default=None)
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--wgrad-fusion", action=argparse.BooleanOptionalAction, default=True,
                   help="weight gradients accumulated inside the GEMM into DDP's main_grad (as the Trainer does)")
    p.add_argument("--onednn-forward", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: our linears' forward GEMMs on oneDNN or torch's matmul; default: what the Trainer "
                        "picks for this CPU (parallel/onednn_training.py)")
    p.add_argument("--widen-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU, --dtype bf16: our linears' GEMMs on fp32 copies of the bf16 operands or in bf16; "
                        "default: what the Trainer picks for this CPU (parallel/onednn_training.py)")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                   help="our side: torch's fused AdamW kernel (as the Trainer does) or Megatron's foreach build")
    p.add_argument("--hf-adamw", choices=("fused", "foreach"), default="fused",
                   help="transformers side: fused is HF Trainer's default on torch >= 2.8, foreach a bare AdamW")
    p.add_argument("--response-tokens", type=int, default=0,
                   help="loss on each sequence's last N tokens only (RFT-shaped); 0 = every token")
    p.add_argument("--loss-tokens-only", action=argparse.BooleanOptionalAction, default=True,
                   help="our output layer projects only the loss's tokens (trainer.loss_tokens_only)")
    p.add_argument("--hf-logits-to-keep", action=argparse.BooleanOptionalAction, default=True,
                   help="with --response-tokens and --loss-tokens-only: HF projects only the loss's positions "
                        "(logits_to_keep), as ours does")
    p.add_argument("--lazy-grad-zeroing", action=argparse.BooleanOptionalAction, default=True,
                   help="our side: weight-gradient GEMMs overwrite main_grad instead of a zeroed buffer "
                        "(trainer.lazy_grad_zeroing)")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time steps and the matmul probe in process CPU seconds (a shared, loaded machine)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", action="store_true", help="then profile one step per side: time by op category")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if not 0 <= args.response_tokens < args.seq - 1:
        p.error(f"--response-tokens {args.response_tokens} must be in [0, --seq - 1 = {args.seq - 1})")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ:  # one torchrun worker: Megatron's side needs a process group
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               os.path.abspath(__file__), *argv]
        env = dict(os.environ)
        cpu_clock = "--clock=cpu" in argv or any(a == "--clock" and b == "cpu" for a, b in zip(argv, argv[1:]))
        if cpu_clock:
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads would burn CPU seconds spinning
        return subprocess.call(cmd, env=env)
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    summary = measure(args)
    print(json.dumps(summary, indent=1))
    if args.fp8:
        print(f"NOTE: megatron runs {summary['precision']['megatron']}, transformers {args.dtype}: the ratio "
              "compares two precisions")
    print(f"RATIO megatron/transformers tokens/s = {summary['ratio_tokens_per_s']:.3f} (best steps; paired "
          f"median {summary['ratio_paired_median']:.3f})  MFU (vs measured matmul peak "
          f"{summary['matmul_peak_gflops']:.0f} GFLOP/s): "
          f"megatron {summary['megatron']['mfu_vs_matmul']:.1%}, "
          f"transformers {summary['transformers']['mfu_vs_matmul']:.1%}; our forward GEMMs: "
          f"{summary['megatron_forward_gemm']}")
    print_table(f"best step by phase ({args.clock} seconds)",
                {s: summary[s]["phases_s_best"] for s in ("megatron", "transformers")})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
