"""Will this run fit? Memory per GPU and step time for a config, before a job is queued.

    python tools/plan.py gemma2_27b_grpo_a100                      # a plan under conf/plan/
    python tools/plan.py gemma2_27b_grpo_a100 parallel=single      # Hydra overrides: refused (exit 1)
    python tools/plan.py sft model=smollm2_135m --memory-gb 24     # any stage config under conf/

Exit status: 0 fits, 1 does not fit (the reason is printed), 2 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_grm.plan import GiB, format_plan, make_plan
from megatron_grm.stages.common import CONF_DIR, load_config


def config_name(name: str) -> str:
    """``gemma2_27b_rft_a100`` → ``plan/gemma2_27b_rft_a100`` when that plan exists; else the name as given."""
    if os.path.exists(os.path.join(CONF_DIR, "plan", f"{name}.yaml")):
        return f"plan/{name}"
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a plan under conf/plan/ or a stage config under conf/ (sft, rft, grpo)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.micro_batch_size=2")
    parser.add_argument("--memory-gb", type=float, default=None, help="GiB per device (default: cluster's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    args = parser.parse_args(argv)
    name = config_name(args.config)
    try:
        plan = make_plan(load_config(name, args.overrides), memory_gb=args.memory_gb)
    except ValueError as err:
        print(f"invalid configuration {name}: {err}", file=sys.stderr)
        return 2
    if args.json:
        worst = plan.worst
        print(json.dumps({"config": name, "fits": plan.fits, "refusal": plan.refusal(),
                          "worst_stage_gib": {k: v / GiB for k, v in vars(worst).items() if isinstance(v, float)},
                          "peak_gib": worst.peak / GiB, "times": plan.times}, indent=1))
    else:
        print(format_plan(plan, name))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
