"""parallel/embedding_grad.py under torchrun: Megatron's real VocabParallelEmbedding in Megatron's real DDP,
once as built and once switched to the main_grad lookup, on the same weights and ids. Rank 0 writes
``<out>`` (JSON): per case, the outputs' and main_grads' max differences, the plain-torch gradient's, and
which path each side's backward took.

Cases: TP = world size, with and without sequence parallelism (the lookup then reduce-scatters), ids with
repeats that fall on every rank's vocabulary slice; then the lookups that must keep Megatron's path.
"""

from __future__ import annotations

import os
import sys

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)
from tests.report import write_on_rank0


def build(config, vocab: int, hidden: int, switch: bool, reduce_scatter: bool, seed: int, wrap: bool = True):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from megatron_grm.parallel import embedding_grad

    torch.manual_seed(seed)
    table = VocabParallelEmbedding(vocab, hidden, init_method=torch.nn.init.normal_,
                                   reduce_scatter_embeddings=reduce_scatter, config=config)
    with torch.no_grad():  # the same full table on both sides, this rank's slice of it
        full = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))
        table.weight.copy_(full[table.vocab_start_index:table.vocab_end_index])
    if switch:
        assert embedding_grad.install(table) == 1
    if not wrap:
        return None, table, full
    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=table)
    return ddp, table, full


def run_case(tp: int, sp: bool, vocab: int = 24, hidden: int = 8, batch: int = 3, seq: int = 6) -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, tensor_model_parallel_size=tp,
                               sequence_parallel=sp, use_cpu_initialization=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    ids[0, :3] = 5  # repeated rows accumulate
    ids[1, 0], ids[1, 1] = 0, vocab - 1  # both ends of the table: the first and the last rank's slices
    # The loss weights, in the lookup's output layout: [b, s, h], or this rank's [s/TP, b, h] under SP.
    weights = torch.randn(*((seq, batch, hidden) if sp else (batch, seq, hidden)), generator=gen)
    rank = parallel_state.get_tensor_model_parallel_rank()
    if sp:
        weights = weights[rank * (seq // tp):(rank + 1) * (seq // tp)]

    sides = {}
    for name, switch in (("megatron", False), ("main_grad", True)):
        ddp, table, full = build(config, vocab, hidden, switch, reduce_scatter=sp, seed=3)
        ddp.zero_grad_buffer()
        out = ddp(ids)
        (out * weights).sum().backward()
        sides[name] = {"out": out.detach(), "main_grad": table.weight.main_grad.clone(),
                       "added_by_lookup": bool(table.weight.grad_added_to_main_grad),
                       "grad_left": table.weight.grad is not None}

    # Plain torch on the full table: d/dW of sum(W[ids] * weights), with weights in the lookup's layout.
    ref_w = full.clone().requires_grad_(True)
    ref_out = ref_w[ids]  # [b, s, h]
    if sp:
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(weights) for _ in range(tp)]
        torch.distributed.all_gather(parts, weights.contiguous(), group=group)
        ref_weights = torch.cat(parts).transpose(0, 1)  # [s, b, h] -> [b, s, h]
        mine = ref_out.transpose(0, 1)[rank * (seq // tp):(rank + 1) * (seq // tp)]
    else:
        ref_weights = weights
        mine = ref_out
    (ref_out * ref_weights).sum().backward()
    lo, hi = rank * vocab // tp, (rank + 1) * vocab // tp
    m, f = sides["megatron"], sides["main_grad"]
    diffs = torch.stack([(m["out"] - f["out"]).abs().max(), (f["out"] - mine.detach()).abs().max(),
                         (m["main_grad"] - f["main_grad"]).abs().max(),
                         (f["main_grad"] - ref_w.grad[lo:hi]).abs().max(), -f["main_grad"].norm()])
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)  # the worst rank's
    return {
        "out_diff": float(diffs[0]),
        "out_vs_torch": float(diffs[1]),
        "main_grad_diff": float(diffs[2]),
        "main_grad_vs_torch": float(diffs[3]),
        "smallest_main_grad_norm": float(-diffs[4]),
        "added_by_lookup": [m["added_by_lookup"], f["added_by_lookup"]],
        "grad_left": [m["grad_left"], f["grad_left"]],
    }


def kept_paths(vocab: int = 16, hidden: int = 4) -> dict:
    """Lookups that must not take the main_grad path; each still trains (main_grad gets the rows)."""
    from megatron.core.transformer import TransformerConfig

    from megatron_grm.parallel.embedding_grad import accumulates_into_main_grad

    tp = torch.distributed.get_world_size()
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, tensor_model_parallel_size=tp,
                               use_cpu_initialization=True)
    ids = torch.tensor([[1, 1, 2, vocab - 1]])
    report = {}
    for case in ("tied", "deterministic", "no_grad", "outside_ddp"):
        ddp, table, _ = build(config, vocab, hidden, switch=True, reduce_scatter=False, seed=4,
                              wrap=case != "outside_ddp")
        if case == "tied":
            table.weight.zero_out_wgrad = True
        if case == "deterministic":
            table.deterministic_mode = True
        if case == "no_grad":
            with torch.no_grad():
                out = ddp(ids)
                takes = accumulates_into_main_grad(table)
            report[case] = {"takes_main_grad_path": takes, "out_requires_grad": out.requires_grad,
                            "out_finite": bool(out.isfinite().all())}
            continue
        if case == "outside_ddp":
            out = table(ids)
            out.sum().backward()
            report[case] = {"takes_main_grad_path": accumulates_into_main_grad(table),
                            "grad_rows": int((table.weight.grad.abs().sum(-1) > 0).sum())}
            continue
        report[case] = {"takes_main_grad_path": accumulates_into_main_grad(table)}
        ddp.zero_grad_buffer()
        ddp(ids).sum().backward()
        report[case]["main_grad_rows"] = int((table.weight.main_grad.abs().sum(-1) > 0).sum())
        report[case]["added_by_lookup"] = bool(table.weight.grad_added_to_main_grad)
    return report


def main(out: str) -> None:
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel

    tp = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's (unset: one process); a rank per TP shard
    init_parallel(ParallelLayout(tensor_parallel=tp))
    report = {"tp": tp, "plain": run_case(tp, sp=False)}
    if tp > 1:
        report["sequence_parallel"] = run_case(tp, sp=True)
    report["kept"] = kept_paths()
    write_on_rank0(out, report)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
