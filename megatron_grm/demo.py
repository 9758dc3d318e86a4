"""SPCT in miniature on one CPU machine: base → RFT → GRPO → MetaRM → evaluation → Hugging Face export.

Every step is the same Hydra entry point a cluster run uses (``torchrun -m megatron_grm.stages.<stage>``
with the stage's ``*_tiny`` CPU preset), chained through checkpoints in one run folder:

    bootstrap (cold-start SFT on teacher judgments)  → evaluate "Base"
    rft  (sample N=3, keep correct, SFT)              → evaluate "RFT"
    grpo (G=4, ±1 rewards, KL to the RFT model)        → evaluate "GRPO" with voting@k and MetaRM@k
    metarm (scalar head on judgments labelled by Eq. 10, from RFT's samples)
    convert_mcore_to_hf (the GRPO model → hf/grm, the MetaRM backbone + head → hf/metarm)

    python -m megatron_grm.demo --run-dir runs/demo          # what scripts/demo.sh runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean

from megatron_grm.stages.eval_compare import compare_runs, comparison_markdown
from megatron_grm.stages.plots import plot_runs, read_scaling
from megatron_grm.train.logger import read_scalars

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Scale:
    """How much work each step does: ``full`` runs in 10-13 minutes on 2 cores (the README's figures), ``test``
    is the suite's."""

    bootstrap_steps: int
    rft_examples: int
    rft_steps: int
    grpo_steps: int
    grpo_val_interval: int  # GRPO validation (grpo_val held-out examples x 4) every this many steps; 0: first and last
    metarm_steps: int
    heldout: int
    ks: list[int] = field(default_factory=lambda: [1, 2, 4])
    grpo_val: int = 512  # held-out examples of GRPO's validation (grpo_tiny's data.val)


SCALES = {
    "full": Scale(bootstrap_steps=1000, rft_examples=1024, rft_steps=80, grpo_steps=60, grpo_val_interval=30,
                  metarm_steps=40, heldout=400, ks=[1, 2, 4, 8]),
    # Base, RFT and GRPO training exactly as in "full": the model learns the task only after ~900 bootstrap
    # steps, and GRPO's reward rise needs 60 steps to stand out of the noise reliably; after 30 it did in 3 of
    # 4 runs (docs/rft.md). Less MetaRM and voting, and GRPO validates at its first and last step only, on 256
    # examples (its 60-step gain, +0.18 ± 0.022 on 512, stands out of the noise by far either way).
    "test": Scale(bootstrap_steps=1000, rft_examples=1024, rft_steps=80, grpo_steps=60, grpo_val_interval=0,
                  metarm_steps=5, heldout=400, ks=[1, 2], grpo_val=256),
}


def latest_iter(run_dir: Path) -> Path:
    ckpts = run_dir / "checkpoints"
    return ckpts / (ckpts / "latest").read_text().strip()


def stage(name: str, overrides: list[str], nproc: int, log_dir: Path) -> float:
    """Run one stage under torchrun; its output goes to ``<log_dir>/<name>.log``; fail loudly with its tail."""
    module = {"bootstrap": "bootstrap", "rft": "rft", "grpo": "grpo", "metarm": "metarm"}.get(name.split("_")[0],
                                                                                              "evaluate")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           f"megatron_grm.stages.{module}", *overrides]
    log = log_dir / f"{name}.log"
    began = time.perf_counter()
    print(f"[demo] {name}: {' '.join(cmd[3:])}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"[demo] {name} failed (exit {proc.returncode}) after {seconds:.0f}s; log {log}:\n{tail}")
    print(f"[demo] {name}: done in {seconds:.0f}s", flush=True)
    return seconds


def evaluate(name: str, run: Path, load: Path, sc: Scale, nproc: int, metarm: Path | None = None,
             ks: list[int] | None = None) -> dict:
    out = run / name
    overrides = ["+experiment=eval_tiny", "model=tiny_grm", f"trainer.run_dir={out}", f"trainer.load={load}",
                 f"eval.benchmarks=[{{name: arithmetic, data: 'arithmetic:heldout:{sc.heldout}'}}]",
                 f"eval.ks=[{','.join(map(str, ks or [1]))}]"]
    if metarm is not None:
        overrides.append(f"eval.metarm={metarm}")
    stage(name, overrides, nproc, run)
    return json.loads((out / "results.json").read_text())


def check_scale(run: Path, scale: str, seed: int) -> None:
    """A rerun in the same folder resumes each stage where it stopped; with another scale or seed it would
    mix two runs (and the stages refuse a checkpoint trained on another LR schedule), so refuse it first."""
    marker = run / "demo_settings.json"
    settings = {"scale": scale, "seed": seed}
    if marker.is_file():
        earlier = json.loads(marker.read_text())
        if earlier != settings:
            raise SystemExit(f"{run} holds a demo run with {earlier}; this one asks for {settings}: "
                             "give another --run-dir")
    marker.write_text(json.dumps(settings) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    sc, run, n = SCALES[args.scale], Path(args.run_dir).resolve(), args.nproc
    run.mkdir(parents=True, exist_ok=True)
    check_scale(run, args.scale, args.seed)
    seed = f"trainer.seed={args.seed}"
    began = time.perf_counter()
    times: dict[str, float] = {}

    times["bootstrap"] = stage("bootstrap", [f"trainer.run_dir={run / 'bootstrap'}", seed,
                                             f"trainer.max_steps={sc.bootstrap_steps}", "data.heldout=null"], n, run)
    base = latest_iter(run / "bootstrap")
    results = {"Base": evaluate("eval_base", run, base, sc, n)}

    times["rft"] = stage("rft", ["+experiment=rft_tiny", f"trainer.run_dir={run / 'rft'}", seed,
                                 f"trainer.load={base}", f"trainer.max_steps={sc.rft_steps}",
                                 f"data.train=arithmetic:train:{sc.rft_examples}", "data.heldout=null"], n, run)
    rft = latest_iter(run / "rft")
    results["RFT"] = evaluate("eval_rft", run, rft, sc, n)

    times["grpo"] = stage("grpo", ["+experiment=grpo_tiny", f"trainer.run_dir={run / 'grpo'}", seed,
                                   f"trainer.load={rft}", f"trainer.max_steps={sc.grpo_steps}",
                                   f"grpo.val_interval={sc.grpo_val_interval}",
                                   f"data.val=arithmetic:heldout:{sc.grpo_val}:7"], n, run)
    grpo = latest_iter(run / "grpo")

    samples = sorted(str(p) for p in (run / "rft" / "samples").glob("*.jsonl"))
    times["metarm"] = stage("metarm", ["+experiment=metarm_tiny", "model=tiny_grm", f"trainer.run_dir={run / 'metarm'}",
                                       seed, f"trainer.load={grpo}", f"trainer.max_steps={sc.metarm_steps}",
                                       f"data.samples=[{','.join(samples)}]"], n, run)
    metarm = latest_iter(run / "metarm")
    results["GRPO"] = evaluate("eval_grpo", run, grpo, sc, n, metarm=metarm, ks=sc.ks)

    hf = run / "hf"
    for name, ckpt in (("grm", grpo), ("metarm", metarm)):  # the GRM, and the MetaRM (its own backbone + head)
        subprocess.run([sys.executable, str(REPO / "tools" / "convert_mcore_to_hf.py"), "--ckpt", str(ckpt),
                        "--out", str(hf / name), "--no-tokenizer"], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
    total = time.perf_counter() - began
    table = final_table(results, sc.ks)
    # Paired by example and by random draw (same seed): does each stage beat the one before beyond noise?
    pairs = [("Base", "RFT"), ("RFT", "GRPO")]
    comparisons = {f"{b} vs {a}": compare_runs(run / f"eval_{a.lower()}", run / f"eval_{b.lower()}") for a, b in pairs}
    paired = "\n".join(comparison_markdown(comparisons[f"{b} vs {a}"], a, b) for a, b in pairs)
    plot_runs({name: read_scaling(run / f"eval_{name.lower()}") for name in results}, str(run / "scaling.png"),
              "Held-out arithmetic pairs: Base, RFT and GRPO against k")
    (run / "demo_results.md").write_text(f"{table}\n\nPaired comparisons (the same {sc.heldout} examples, response "
                                         f"orders and random draws):\n\n{paired}")
    grpo_reward = read_scalars(run / "grpo", "train/rollout/reward_mean")
    validation = {tag: read_scalars(run / "grpo", f"val/{tag}") for tag in ("reward_mean", "reward_gain",
                                                                             "reward_gain_se")}
    (run / "demo_results.json").write_text(json.dumps({"results": results, "seconds": times, "total": total,
                                                       "grpo_reward_mean": grpo_reward,
                                                       "grpo_validation": validation,
                                                       "paired": {label: [asdict(c) for c in cs]
                                                                  for label, cs in comparisons.items()}},
                                                      indent=2, default=str))
    print("\n" + table + "\n\n" + paired)
    third = max(1, len(grpo_reward) // 3)
    print(f"\nGRPO mean reward of its rollouts: first {third} steps {fmean(grpo_reward[:third]):+.3f}, "
          f"last {third} steps {fmean(grpo_reward[-third:]):+.3f}")
    if validation["reward_mean"]:
        print(f"GRPO validation reward (held-out, sampled): {validation['reward_mean'][0]:+.3f} at step 0, "
              f"{validation['reward_mean'][-1]:+.3f} at the end; paired gain {validation['reward_gain'][-1]:+.3f} "
              f"± {validation['reward_gain_se'][-1]:.3f}")
    print(f"\nrun folder:   {run}\nfigure:       {run / 'scaling.png'} (accuracy against k, the three models)\n"
          f"TensorBoard:  tensorboard --logdir {run}\n"
          f"HF export:    {hf / 'grm'} (the GRM; README: score an example), {hf / 'metarm'} (MetaRM)\n"
          f"total time:   {total / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})")


def final_table(results: dict[str, dict], ks: list[int]) -> str:
    """Held-out Eq. 10 accuracy (%) in the paper's shape: one row per model and inference method."""
    rows = [("Base (bootstrap) greedy", results["Base"], "Greedy"), ("RFT greedy", results["RFT"], "Greedy"),
            ("GRPO greedy", results["GRPO"], "Greedy")]
    rows += [(f"GRPO Voting@{k}", results["GRPO"], f"Voting@{k}") for k in ks]
    rows += [(f"GRPO MetaRM@{k}", results["GRPO"], f"MetaRM@{k}") for k in ks]
    lines = ["| model / method | held-out arithmetic accuracy (%) |", "|---|---|"]
    for label, res, row in rows:
        value = res["accuracy"].get(row, {}).get("arithmetic")
        lines.append(f"| {label} | {'n/a' if value is None else f'{100 * value:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
