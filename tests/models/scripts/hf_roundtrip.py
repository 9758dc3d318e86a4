"""One process (torchrun, 1 rank): HF -> Megatron (TP=1) -> logits vs transformers -> HF, per family.

    --mode tp1     convert every family at TP=1, compare logits with transformers, export back to HF,
                   and export a checkpoint that carries a MetaRM head
    --mode export  export the checkpoints another layout wrote (``ck_<layout>_<family>``)
Writes ``report_<mode>.json`` into --work; the pytest side asserts on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def logits_parity(hf_dir: Path, ckpt: Path) -> dict[str, float]:
    from megatron_grm.models import hf_parity as parity
    from megatron_grm.models.hf_convert import load_megatron_model

    hf_model = parity.load_hf_model(hf_dir)
    model, cfg, _, _ = load_megatron_model(ckpt)
    worst, largest = 0.0, 0.0
    for seed, (batch, seq) in enumerate([(2, 24), (1, 40)]):
        tokens = parity.random_tokens(cfg.vocab_size, batch, seq, seed)
        ours, theirs = parity.megatron_logits(model, tokens, cfg.vocab_size), parity.hf_logits(hf_model, tokens)
        worst = max(worst, float((ours - theirs).abs().max()))
        largest = max(largest, float(theirs.abs().max()))
    return {"max_abs_logit_diff": worst, "max_abs_logit": largest, **loss_parity(model, hf_model, cfg)}


def loss_parity(model, hf_model, cfg) -> dict[str, float | bool]:
    """GPTModel's loss path (labels given: loss computed inside forward, after any soft-capping) against
    cross-entropy of transformers' logits, and a backward pass that reaches every parameter.

    Megatron's loss normalises over the padded vocabulary too (its extra columns are zero rows here,
    logit 0 after soft-capping), so the reference appends those columns; the shift they cause is reported.
    """
    import torch.nn.functional as F

    from megatron_grm.models import hf_parity as parity

    tokens = parity.random_tokens(cfg.vocab_size, 2, 24, seed=5)
    labels = parity.random_tokens(cfg.vocab_size, 2, 24, seed=6)
    position_ids, mask = torch.arange(24).expand(2, 24), parity.causal_mask(24)
    with torch.enable_grad():
        loss = model(tokens, position_ids, mask, labels=labels)  # [b, s] per-token loss
        loss.sum().backward()
    with torch.no_grad():
        padded_columns = model(tokens, position_ids, mask)[..., cfg.vocab_size:]
    hf = parity.hf_logits(hf_model, tokens)
    reference = F.cross_entropy(torch.cat([hf, padded_columns], -1).flatten(0, 1), labels.flatten(),
                                reduction="none").view(2, 24)
    unpadded = F.cross_entropy(hf.flatten(0, 1), labels.flatten(), reduction="none").view(2, 24)
    grads = [p.grad for p in model.parameters()]
    return {"max_abs_loss_diff": float((loss.detach() - reference).abs().max()),
            "padded_vocab_loss_shift": float((loss.detach() - unpadded).mean()),
            "padded_vocab_columns": int(padded_columns.shape[-1]),
            "all_grads_finite_nonzero": all(g is not None and bool(g.isfinite().all()) and bool(g.abs().sum() > 0)
                                            for g in grads)}


def checkpoint_with_metarm_head(ckpt: Path, out: Path, expected: Path) -> None:
    """Re-save a converted checkpoint with the MetaRM stage's head attached (randomised, bias included);
    keep the head's tensors to compare with the export."""
    from safetensors.torch import save_file

    from megatron_grm.models.hf_convert import load_megatron_model
    from megatron_grm.models.metarm import attach_metarm_head
    from megatron_grm.train.checkpoint import save_checkpoint

    model, _, metadata, _ = load_megatron_model(ckpt)
    attach_metarm_head(model, seed=7)
    with torch.no_grad():
        model.metarm_head.bias.fill_(0.25)
    save_checkpoint(str(out), 3, {"model": model.sharded_state_dict()}, {}, {**metadata, "stage": "metarm"})
    save_file({k: v.detach().clone() for k, v in model.metarm_head.state_dict().items()}, str(expected))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-root", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--mode", choices=("tp1", "export"), required=True)
    parser.add_argument("--layout", default="tp2pp2")
    parser.add_argument("--families", nargs="+", default=["llama", "qwen2", "gemma2"])
    args = parser.parse_args()

    from megatron_grm.models.hf_convert import convert_hf_to_mcore, export_mcore_to_hf
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel

    init_parallel(ParallelLayout())
    hf_root, work = Path(args.hf_root), Path(args.work)
    report: dict[str, dict] = {}
    for family in args.families:
        hf_dir = hf_root / f"hf_{family}"
        if args.mode == "tp1":
            ckpt = work / f"ck_tp1_{family}"
            convert_hf_to_mcore(hf_dir, ckpt, ParallelLayout())
            report[family] = logits_parity(hf_dir, ckpt)
            export_mcore_to_hf(ckpt, work / f"out_tp1_{family}")
        else:
            export_mcore_to_hf(work / f"ck_{args.layout}_{family}", work / f"out_{args.layout}_{family}",
                               max_shard_bytes=40_000)  # small threshold: also writes a sharded index
            report[family] = {"exported": True}
    if args.mode == "tp1":
        checkpoint_with_metarm_head(work / "ck_tp1_llama", work / "ck_metarm", work / "metarm_expected.safetensors")
        export_mcore_to_hf(work / "ck_metarm", work / "out_metarm")
    (work / f"report_{args.mode}.json").write_text(json.dumps(report, indent=2))
    destroy_parallel()


if __name__ == "__main__":
    main()
