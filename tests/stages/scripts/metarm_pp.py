"""MetaRM scoring over a 2-stage pipeline (torchrun, 2 ranks): several micro-batches per forward-only
schedule call give the logits of one micro-batch per call, and the calls are counted."""

from __future__ import annotations

import argparse
import json
import os
import random

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)

os.environ["CUDA_VISIBLE_DEVICES"] = ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import megatron.core.pipeline_parallel as pipeline_parallel
    import torch

    from megatron_grm.models.metarm import attach_metarm_head, metarm_logits
    from megatron_grm.models.provider import build_model
    from megatron_grm.stages.common import load_config, prepare_run

    run = prepare_run(load_config("sft", ["model=tiny", "parallel=pp2", f"trainer.run_dir={args.run_dir}"]))
    model = attach_metarm_head(build_model(run.model, run.parallel, run.precision), seed=3)
    rng = random.Random(0)
    sequences = [[rng.randrange(3, 99) for _ in range(rng.randrange(5, 300))] for _ in range(21)]

    calls: list[int] = []
    real = pipeline_parallel.get_forward_backward_func

    def counted():
        schedule = real()

        def run_schedule(**kwargs):
            calls.append(kwargs["num_microbatches"])
            return schedule(**kwargs)

        return run_schedule

    pipeline_parallel.get_forward_backward_func = counted
    one_by_one = metarm_logits(model, sequences, 2, 0, micro_batches_per_call=1)
    per_call_one = list(calls)
    calls.clear()
    grouped = metarm_logits(model, sequences, 2, 0)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"one_by_one": one_by_one, "grouped": grouped, "calls_one": per_call_one,
                       "calls_grouped": list(calls), "stages": run.parallel.pipeline_parallel}, f)


if __name__ == "__main__":
    main()
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
