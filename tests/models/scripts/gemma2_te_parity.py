"""GPU only (torchrun, 1 rank): a Gemma-2 checkpoint converted with the local spec, loaded into the
Transformer Engine spec model, gives transformers' logits. Writes ``report_te.json`` into --work."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--work", required=True)
    args = parser.parse_args()

    from megatron_grm.models import hf_parity as parity
    from megatron_grm.models.hf_convert import convert_hf_to_mcore, open_hf
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel.device import use_te_spec
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel
    from megatron_grm.train.checkpoint import latest_checkpoint, load_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    init_parallel(ParallelLayout())
    ckpt = Path(args.work) / "ck_gemma2"
    convert_hf_to_mcore(args.hf, ckpt, ParallelLayout())
    cfg = open_hf(args.hf).cfg
    model = build_model(cfg, ParallelLayout(), PrecisionConfig(), use_te=True)
    folder = latest_checkpoint(str(ckpt))
    model.load_state_dict(load_checkpoint(folder, {"model": model.sharded_state_dict()})["model"], strict=False)
    model.eval()
    tokens = parity.random_tokens(cfg.vocab_size, 2, 24).cuda()
    hf_model = parity.load_hf_model(args.hf).cuda()
    diff = (parity.megatron_logits(model, tokens, cfg.vocab_size) - parity.hf_logits(hf_model, tokens)).abs().max()
    report = {"te_spec": use_te_spec(), "max_abs_logit_diff": float(diff),
              "modules": sorted({type(m).__name__ for m in model.modules()})}
    (Path(args.work) / "report_te.json").write_text(json.dumps(report, indent=2))
    destroy_parallel()


if __name__ == "__main__":
    main()
