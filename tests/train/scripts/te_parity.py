"""Same weights through the Transformer Engine spec and the local spec: logits, loss and gradients agree.

GPU only (TE needs CUDA). Run by tests/train/test_te_spec_parity_gpu.py under torchrun (1 process).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()

    from megatron.core import dist_checkpointing

    from megatron_grm.models.config import ModelConfig
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    layout = ParallelLayout()
    init_parallel(layout, seed=5)
    cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=8,
                      num_query_groups=4, vocab_size=512, max_position_embeddings=256)
    precision = PrecisionConfig(params_dtype=args.dtype)
    local = build_model(cfg, layout, precision, use_te=False)
    te = build_model(cfg, layout, precision, use_te=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "ckpt")
        os.makedirs(folder)
        dist_checkpointing.save(local.sharded_state_dict(), folder)
        te.load_state_dict(dist_checkpointing.load(te.sharded_state_dict(), folder))

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 128), generator=g).cuda()
    position_ids = torch.arange(128, device="cuda").expand(2, 128)
    results = {}
    for name, model in (("local", local), ("te", te)):
        logits = model(tokens, position_ids, None)
        loss = model(tokens, position_ids, None, labels=tokens).float().mean()
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
        results[name] = (logits.float().detach(), float(loss), float(grad_norm))
    diff = (results["local"][0] - results["te"][0]).abs().max().item()
    report = {"max_abs_logit_diff": diff, "loss_local": results["local"][1], "loss_te": results["te"][1],
              "grad_norm_local": results["local"][2], "grad_norm_te": results["te"][2],
              "device": torch.cuda.get_device_name()}
    print(json.dumps(report))
    with open(args.out, "w") as f:
        json.dump(report, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
