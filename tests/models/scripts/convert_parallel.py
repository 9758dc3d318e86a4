"""TP*PP ranks (torchrun): convert each family at this layout; check the TP=1 checkpoint of the same model
loads into this layout bit-identically to the shards filled straight from HF (the training loop's
``load_weights`` path: dist_checkpointing resharding); and run Megatron's pipeline schedule forward at
this layout with labels, comparing the summed token loss with cross-entropy of transformers' logits.
Rank 0 writes ``report_<layout>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)


def parallel_loss_vs_transformers(model, hf_dir: Path, vocab_size: int) -> float:
    """|sum of per-token losses from the TP x PP schedule - the same sum from transformers' logits|.

    The padded vocabulary columns are zero rows here, i.e. logit 0 (also after soft-capping); the
    reference appends them because Megatron's cross-entropy normalises over them too.
    """
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_grm.models import hf_parity as parity

    tokens = parity.random_tokens(vocab_size, 2, 24, seed=11)
    labels = parity.random_tokens(vocab_size, 2, 24, seed=12)
    batch = {"tokens": tokens, "labels": labels, "position_ids": torch.arange(24).expand(2, 24),
             "attention_mask": parity.causal_mask(24)}

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        output = chunk(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])

        def loss_func(per_token):
            total = per_token.float().sum()
            return total, torch.tensor(per_token.numel(), dtype=torch.int), {"nll": total.detach()}

        return output, loss_func

    with torch.no_grad():
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=24, micro_batch_size=2, forward_only=True)
        ours = torch.tensor([float(sum(r["nll"] for r in reduced)) if reduced else 0.0], dtype=torch.float64)
        torch.distributed.all_reduce(ours, group=parallel_state.get_pipeline_model_parallel_group())
        padded = model.config.tensor_model_parallel_size * 128 * -(-vocab_size // (128 * model.config
                                                                               .tensor_model_parallel_size))
        hf = parity.hf_logits(parity.load_hf_model(hf_dir), tokens)
        logits = torch.cat([hf, hf.new_zeros(*hf.shape[:-1], padded - vocab_size)], dim=-1)
        reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return abs(float(ours) - float(reference))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-root", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--families", nargs="+", default=["llama", "qwen2", "gemma2"])
    args = parser.parse_args()

    from megatron_grm.models.hf_convert import convert_hf_to_mcore, fill_model_from_hf, open_hf
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel
    from megatron_grm.train.checkpoint import latest_checkpoint, load_checkpoint

    layout = ParallelLayout(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    init_parallel(layout)
    name = f"tp{args.tp}pp{args.pp}"
    hf_root, work = Path(args.hf_root), Path(args.work)
    report: dict[str, dict] = {}
    for family in args.families:
        hf_dir = hf_root / f"hf_{family}"
        convert_hf_to_mcore(hf_dir, work / f"ck_{name}_{family}", layout)
        src = open_hf(hf_dir)
        direct = build_model(src.cfg, layout, PrecisionConfig(), use_te=False)
        fill_model_from_hf(direct, src)
        resharded = build_model(src.cfg, layout, PrecisionConfig(), use_te=False)
        tp1 = latest_checkpoint(str(work / f"ck_tp1_{family}"))
        resharded.load_state_dict(load_checkpoint(tp1, {"model": resharded.sharded_state_dict()})["model"])
        a, b = dict(direct.named_parameters()), dict(resharded.named_parameters())
        counts = torch.tensor([sum(not torch.equal(a[k], b[k]) for k in a), len(a)])
        torch.distributed.all_reduce(counts)
        report[family] = {"params_differing_after_reshard": int(counts[0]), "params_checked": int(counts[1]),
                          "abs_loss_sum_diff": parallel_loss_vs_transformers(direct, hf_dir, src.cfg.vocab_size)}
    if torch.distributed.get_rank() == 0:
        (work / f"report_{name}.json").write_text(json.dumps(report, indent=2))
    destroy_parallel()


if __name__ == "__main__":
    main()
