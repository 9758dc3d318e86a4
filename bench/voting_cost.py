"""Cost of voting@k relative to one greedy judgment, for the same prompts, on our rollout engine.

    python bench/voting_cost.py                       # CPU: Llama hidden 512, 4 layers; k = 4, 8, 16; 48 tokens
    python bench/voting_cost.py --ks 8 32 --prompts 8
    python bench/voting_cost.py --clock cpu           # a shared, loaded machine: process CPU seconds
    python bench/voting_cost.py --backend dynamic     # CUDA: Megatron-Core's dynamic engine instead of auto's pick

Voting@k (paper Sec. 4.1) samples k judgments at temperature 0.5 and shuffles the order of the
responses for each, so the engine gets ``prompts × k`` prompts of equal length (not one prompt with
n = k), of which only as many differ as there are orders drawn: with two responses at most two per
example, and the engine prefills each distinct prompt once (``rollout/shared_prefill.py``). Prompts
here are synthetic token ids shaped like a judgment request (a header, then the responses as blocks
whose order is permuted per sample); the model is random-init (the cost of decoding does not depend on
the weights), and EOS is ignored so every sample generates ``--new-tokens``. Reported: wall time of
greedy (1 sample per prompt) and of voting@k, their ratio, and that ratio over k (1.0 = no gain from
batching the k samples together).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_grm.models.config import ModelConfig


def judgment_prompts(args: argparse.Namespace, k: int, seed: int) -> list[list[int]]:
    """``prompts × k`` prompts: for each example, k copies with the response blocks in a fresh order."""
    rng = random.Random(seed)
    out = []
    for _ in range(args.prompts):
        header = [rng.randrange(3, args.vocab) for _ in range(args.header_tokens)]
        blocks = [[rng.randrange(3, args.vocab) for _ in range(args.response_tokens)] for _ in range(args.responses)]
        for _ in range(k):
            order = list(range(args.responses))
            rng.shuffle(order)
            out.append(header + [t for i in order for t in blocks[i]])
    return out


def build_engine(args: argparse.Namespace):
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel import ParallelLayout, init_parallel
    from megatron_grm.rollout import RolloutEngine

    cfg = ModelConfig(family="llama", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=4096)
    layout = ParallelLayout()
    init_parallel(layout, seed=args.seed)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    model = build_model(cfg, layout, PrecisionConfig(dtype)).eval()
    return RolloutEngine(model, end_ids=(2,), vocab_size=args.vocab, max_tokens_in_flight=1 << 22,
                         max_batch_size=args.max_batch, progress=False, backend=args.backend), cfg


def timed(engine, prompts: list[list[int]], sampling, clock=time.perf_counter) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    samples = engine.generate(prompts, n=1, sampling=sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert all(len(s.token_ids) == sampling.max_new_tokens for s in samples)
    return clock() - start


def measure(args: argparse.Namespace) -> dict:
    from megatron_grm.rollout import SamplingConfig

    engine, cfg = build_engine(args)
    # CPU time of this process does not count the time other processes hold the cores (shared machine).
    clock = time.process_time if args.clock == "cpu" and not torch.cuda.is_available() else time.perf_counter
    greedy = SamplingConfig(greedy=True, max_new_tokens=args.new_tokens, ignore_eos=True)
    vote = SamplingConfig(temperature=0.5, max_new_tokens=args.new_tokens, ignore_eos=True, seed=args.seed)
    base_prompts = judgment_prompts(args, 1, args.seed)
    timed(engine, base_prompts[:2], greedy)  # warm-up (allocations, lazy init)
    # On CUDA the first call at a new batch shape pays one-off work (torch.compile of Megatron's fused SwiGLU,
    # cuDNN attention plans): 3-10 s on an H200 against ~0.5 s steady (bench/rollout_profile.py), most of a
    # timed call. Each shape runs once first.
    warm_each = torch.cuda.is_available()
    if warm_each:
        timed(engine, base_prompts, greedy)
    greedy_s = min(timed(engine, base_prompts, greedy, clock) for _ in range(args.repeats))
    rows = []
    for k in args.ks:
        prompts = judgment_prompts(args, k, args.seed)
        distinct = len({tuple(p) for p in prompts})
        if warm_each:
            timed(engine, prompts, vote)
        seconds = min(timed(engine, prompts, vote, clock) for _ in range(args.repeats))
        rows.append({"k": k, "seconds": seconds, "ratio_to_greedy": seconds / greedy_s,
                     "ratio_per_sample": seconds / greedy_s / k, "distinct_prompts": distinct})
        print(f"voting@{k:<3} {seconds:7.2f} s  = {seconds / greedy_s:6.2f}x greedy "
              f"({seconds / greedy_s / k:.2f}x per sample; {distinct} distinct of {len(prompts)} prompts)",
              flush=True)
    return {
        "bench": "voting_cost", "date": time.strftime("%Y-%m-%d %H:%M"), "device": "cuda" if
        torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
        "params": cfg.num_parameters(), "prompts": args.prompts,
        "prompt_tokens": args.header_tokens + args.responses * args.response_tokens, "new_tokens": args.new_tokens,
        "backend": engine.backend.name, "clock": args.clock, "greedy_seconds": greedy_s, "voting": rows,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=4, help="examples judged")
    p.add_argument("--header-tokens", type=int, default=64)
    p.add_argument("--responses", type=int, default=2)
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48, help="judgment length")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU seconds (a shared, loaded machine)")
    p.add_argument("--backend", choices=("auto", "static", "dynamic"), default="auto",
                   help="the rollout engine's backend (dynamic: CUDA only)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ:  # one torchrun worker: Megatron's inference needs a process group
        env = dict(os.environ)
        if "--clock=cpu" in argv or any(a == "--clock" and b == "cpu" for a, b in zip(argv, argv[1:])):
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads would burn CPU seconds spinning
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                                os.path.abspath(__file__), *argv], env=env)
    args = parse_args(argv)
    summary = measure(args)
    print(json.dumps(summary, indent=1))
    worst = max(summary["voting"], key=lambda r: r["k"])
    print(f"RATIO voting@{worst['k']} / greedy = {worst['ratio_to_greedy']:.2f}x "
          f"({worst['ratio_per_sample']:.2f}x per sample, {summary['backend']} backend)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
