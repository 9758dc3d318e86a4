"""One rank (torchrun): a checkpoint written without Transformer Engine loads into a model whose modules
carry ``_extra_state`` entries the checkpoint lacks (TE's FP8 metadata; with TE installed Megatron's final
norm is a TENorm), and an entry that is really missing is an error naming it. Writes a JSON report."""

from __future__ import annotations

import argparse
import json
import os

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megatron_grm.models.config import ModelConfig
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model
    from megatron_grm.parallel import ParallelLayout, destroy_parallel, init_parallel
    from megatron_grm.train.checkpoint import load_checkpoint

    layout = ParallelLayout()
    init_parallel(layout, seed=0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, vocab_size=128)
    source = build_model(cfg, layout, PrecisionConfig("fp32"), use_te=False)
    folder = f"{args.work}/ckpt"
    os.makedirs(folder)
    dist_checkpointing.save({"model": source.sharded_state_dict()}, folder)

    target = build_model(cfg, layout, PrecisionConfig("fp32"), use_te=False)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    report: dict = {"checkpoint_has_final_norm_extra_state": any(
        "final_layernorm._extra_state" in k for k in source.sharded_state_dict())}

    # What TE's final norm adds to the model's sharded state dict (a ShardedObject, as Megatron makes it).
    state = target.sharded_state_dict()
    te_key = "decoder.final_layernorm._extra_state"
    state[te_key] = ShardedObject(te_key, torch.zeros(1), (1,), (0,), replica_id=0)
    loaded = load_checkpoint(folder, {"model": state})["model"]
    report["te_extra_state_value"] = repr(loaded.get(te_key, "absent"))
    del loaded[te_key]
    target.load_state_dict(loaded)
    report["max_weight_diff"] = max(float((a - b).abs().max()) for a, b in
                                    zip(source.state_dict().values(), target.state_dict().values())
                                    if isinstance(a, torch.Tensor) and a.is_floating_point())

    state = target.sharded_state_dict()
    state["decoder.extra.weight"] = ShardedTensor.from_rank_offsets("decoder.extra.weight", torch.zeros(4))
    try:
        load_checkpoint(folder, {"model": state})
        report["missing_error"] = None
    except KeyError as e:
        report["missing_error"] = str(e)
    with open(args.out, "w") as f:
        json.dump(report, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
