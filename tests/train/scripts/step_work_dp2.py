"""A step's tokens and FLOPs under two data-parallel ranks whose micro-batches differ in width (as the
length-bucketed producer gives them): rank 0 writes ``<out>`` with what each rank reports and what both
ranks' micro-batches hold."""

from __future__ import annotations

import sys

import torch

from tests.report import write_on_rank0


def main(run_dir: str, out: str) -> None:
    from megatron_grm.stages.common import load_config, prepare_run
    from megatron_grm.train.loop import Trainer

    run = prepare_run(load_config("sft", ["model=tiny", f"trainer.run_dir={run_dir}", "trainer.micro_batch_size=1",
                                          "trainer.global_batch_size=4", "trainer.seq_length=64"]))
    trainer = Trainer(run)
    widths = {0: [16, 48], 1: [32, 64]}
    padding = 4  # each row: a document of width - 4 tokens, then padding (position ids 0)

    def row(width: int) -> dict[str, torch.Tensor]:
        positions = torch.zeros(1, width, dtype=torch.long)
        positions[0, :width - padding] = torch.arange(width - padding)
        return {"tokens": torch.zeros(1, width, dtype=torch.long), "position_ids": positions}

    mine = [row(w) for w in widths[torch.distributed.get_rank()]]
    tokens, flops, batch_tokens = trainer._step_work(mine)
    reported = [torch.zeros(3, dtype=torch.float64) for _ in range(2)]
    torch.distributed.all_gather(reported, torch.tensor([tokens, flops, batch_tokens], dtype=torch.float64))
    every = [w for ws in widths.values() for w in ws]
    write_on_rank0(out, {
        "reported": [r.tolist() for r in reported],
        "expected_tokens": sum(w - padding for w in every),
        "expected_flops": sum(run.model.flops_per_token(w - padding) * (w - padding) for w in every),
        "expected_batch_tokens": sum(every),
    })


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
