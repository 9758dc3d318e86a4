"""MetaRM stage for a few steps, then the evaluation stage on RMB files read in place (torchrun, 2 ranks).

The tiny model's context is raised to 2048 positions (rotary: no weights change) so that a handful of
RMB's shorter examples fit; the rest are skipped and counted by the evaluation. The MetaRM checkpoint
serves both as the GRM (its backbone) and as the MetaRM (its head). The evaluation runs twice, in chunks
of 4 and of 1 example(s) per rank, then once more meta-scoring only, stopped by a signal and rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

os.environ["CUDA_VISIBLE_DEVICES"] = ""

TINY = ("model=tiny", "model.max_position_embeddings=2048")
FILE = "Helpfulness/Chat/Casual Conversation.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--rmb", required=True)
    ap.add_argument("--samples", required=True, help="synthetic RFT sample file for the MetaRM")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from megatron_grm.stages.common import load_config
    from megatron_grm.stages.evaluate import evaluate
    from megatron_grm.stages.metarm import train_metarm

    metarm_dir = os.path.join(args.root, "metarm")
    train_metarm(load_config("metarm", [
        "+experiment=metarm_tiny", *TINY, f"trainer.run_dir={metarm_dir}", "trainer.load=null",
        "metarm.random_backbone=true", "trainer.max_steps=2",
        "optimizer.warmup_steps=0", "trainer.seq_length=544", f"data.samples=[{args.samples}]",
        "data.train=arithmetic:train:4", "metarm.fresh.n=2", "metarm.fresh.max_new_tokens=32"]))
    eval_dir = os.path.join(args.root, "eval")
    ckpt = os.path.join(metarm_dir, "checkpoints")
    benchmarks = (f"[{{name:rmb_pairwise,data:'rmb:{args.rmb}:pairwise',files:['{FILE}'],limit:8}},"
                  f"{{name:rmb_bon,data:'rmb:{args.rmb}:bon',files:['{FILE}'],limit:4}}]")
    settings = ["+experiment=eval_tiny", *TINY, f"trainer.load={ckpt}", f"eval.metarm={ckpt}",
                f"eval.benchmarks={benchmarks}", "eval.ks=[1,2,4]", "eval.max_new_tokens=24",
                "eval.judge_baseline=true"]
    evaluate(load_config("evaluate", [*settings, f"trainer.run_dir={eval_dir}", "eval.chunk_examples=4"]))
    # The same evaluation in chunks of one example per rank: other company in every generate call.
    rechunked_dir = os.path.join(args.root, "eval_rechunked")
    evaluate(load_config("evaluate", [*settings, f"trainer.run_dir={rechunked_dir}", "eval.chunk_examples=1"]))
    # Meta-scoring the first run's draws again (imported: their meta scores are set aside), with a stop
    # signal arriving during the first chunk: the stage exits 75 keeping that chunk; the rerun scores the rest.
    import megatron_grm.models.metarm as metarm_module
    from megatron_grm.train.signals import stop_request

    stopped_dir = os.path.join(args.root, "eval_stopped")
    scored: list[int] = []
    real_logits = metarm_module.metarm_logits

    def counting_logits(model, sequences, *rest):
        if not scored and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        scored.append(len(sequences))
        return real_logits(model, sequences, *rest)

    metarm_module.metarm_logits = counting_logits
    stopped = [*settings, f"trainer.run_dir={stopped_dir}", "eval.chunk_examples=1",
               f"eval.samples_in={os.path.join(eval_dir, 'samples.jsonl')}"]
    stop_request()
    exit_code = None
    try:
        evaluate(load_config("evaluate", stopped))
    except SystemExit as stop:
        exit_code = stop.code
    first_call = list(scored)
    with open(os.path.join(stopped_dir, "samples.jsonl")) as f:
        kept = [json.loads(line) for line in f]
    stop_request().requested = False
    evaluate(load_config("evaluate", stopped))
    metarm_module.metarm_logits = real_logits
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"run_dir": eval_dir, "rechunked_dir": rechunked_dir, "metarm_dir": metarm_dir,
                       "stopped_dir": stopped_dir, "stop_exit_code": exit_code, "scored_before_stop": first_call,
                       "scored_after": scored[len(first_call):], "kept_at_stop": kept}, f)


if __name__ == "__main__":
    main()
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
