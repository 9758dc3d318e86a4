"""Training at PP = 2, rollouts on a TP = 1 / PP = 1 copy refit from it (torchrun, 2 ranks): the copy runs
over its own process groups, not the training pipeline's, each rank decoding with the whole model."""

from __future__ import annotations

import argparse

from tests.report import write_on_rank0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.rollout import RolloutEngine, SamplingConfig
    from megatron_grm.rollout.refit import build_inference_model
    from megatron_grm.stages.common import load_config, prepare_run
    from megatron_grm.train.loop import Trainer
    from tests.rollout.scripts.rollout_checks import reference_greedy

    run = prepare_run(load_config("sft", ["model=tiny", "parallel=pp2", f"trainer.run_dir={args.run_dir}",
                                          "trainer.micro_batch_size=1", "trainer.global_batch_size=1"]))
    trainer = Trainer(run)
    tok = load_tokenizer("char")
    prompts = [tok.encode(t, add_bos=True) for t in ("Hi", "What is 2+2? Answer:", "Tell me a story about")]
    greedy = SamplingConfig(greedy=True, max_new_tokens=12)
    copy = build_inference_model(run.model, run.precision, tensor_parallel=1, vocab_size=trainer.unwrapped.vocab_size)
    refit = RolloutEngine(copy, tok, source_model=trainer.unwrapped).generate(prompts, sampling=greedy)
    # The reference: an argmax loop of full forwards of the refit copy, a whole model on every rank.
    expected = [reference_greedy(copy, p, 12, tok.vocab_size, tok.eos_id) for p in prompts]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, [s.token_ids for s in refit])
    write_on_rank0(args.out, {
        "expected": expected, "refit_per_rank": gathered,
        "stages": run.parallel.pipeline_parallel, "copy_pipeline": copy.pg_collection.pp.size(),
    })


if __name__ == "__main__":
    main()
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
