"""Where a rollout's time goes: successive greedy calls on the voting benchmark's prompts, then one profiled.

    python bench/rollout_profile.py                   # the model and prompts of bench/voting_cost.py
    python bench/rollout_profile.py --rows 4 16 --calls 3 --top 25

For each batch size in ``--rows`` it times ``--calls`` identical generate calls (the first pays one-off
costs such as compiling a kernel for a new shape; the rest are steady state) and reports seconds per
decode step; then it profiles one more steady call with ``torch.profiler`` (CPU, and CUDA when present)
and prints the ops with the most self time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ:  # one torchrun worker: Megatron's inference needs a process group
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                                os.path.abspath(__file__), *argv])
    import voting_cost

    from megatron_grm.rollout import SamplingConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[4, 16])
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    own, rest = p.parse_known_args(argv)
    args = voting_cost.parse_args(rest)
    engine, _ = voting_cost.build_engine(args)
    greedy = SamplingConfig(greedy=True, max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = voting_cost.judgment_prompts(args, max(own.rows), args.seed)
    print(f"backend {engine.backend.name}, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{args.new_tokens} new tokens per row")
    for rows in own.rows:
        seconds = [voting_cost.timed(engine, prompts[:rows], greedy) for _ in range(own.calls)]
        per_step = ", ".join(f"{1e3 * s / args.new_tokens:.2f}" for s in seconds)
        print(f"rows {rows:4d}: calls {', '.join(f'{s:.3f}' for s in seconds)} s = {per_step} ms per decode step")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        seconds = voting_cost.timed(engine, prompts[:own.rows[-1]], greedy)
    print(f"profiled call (rows {own.rows[-1]}): {seconds:.3f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=own.top, max_name_column_width=60))
    if torch.cuda.is_available():
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=own.top // 2,
                                        max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
