"""Compare two Megatron distributed checkpoints tensor by tensor (model weights and optimizer state).

    torchrun --standalone --nproc-per-node 1 tests/slurm/compare_checkpoints.py CKPT_A CKPT_B OUT.json

Each CKPT is a checkpoint root (with ``latest``) or one ``iter_*`` folder. Every tensor the checkpoint
holds is loaded whole with Megatron-Core's ``dist_checkpointing`` (``load_tensors_metadata`` gives the
unsharded ShardedTensors, which ``load`` then fills), so two runs with the same layout can be compared
exactly, whatever their TP/DP sharding. Non-tensor entries (step, loss history, scheduler and data
position) are compared too. Writes ``{"tensors": n, "model_tensors": m, "differing": [...],
"max_abs_diff": x, "only_in_a": [...], "only_in_b": [...], "train_state_a": ..., "train_state_b": ...}``.
"""

from __future__ import annotations

import json
import os
import sys


def resolve(folder: str) -> str:
    latest = os.path.join(folder, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            return os.path.join(folder, f.read().strip())
    return folder


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts/lists of tensors as one ``{"a.b.0": tensor}`` dict."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def load_all(folder: str) -> tuple[dict, dict]:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(folder)
    tensors = flatten(dist_checkpointing.load(metadata, folder))
    common = dist_checkpointing.load_common_state_dict(folder)
    return tensors, common


def main(a: str, b: str, out: str) -> int:
    import torch

    from megatron_grm.parallel.device import use_cuda

    if not use_cuda():
        from megatron_grm.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    torch.distributed.init_process_group("gloo")
    folder_a, folder_b = resolve(a), resolve(b)
    tensors_a, common_a = load_all(folder_a)
    tensors_b, common_b = load_all(folder_b)
    differing, max_diff = [], 0.0
    for key in sorted(set(tensors_a) & set(tensors_b)):
        ta, tb = tensors_a[key], tensors_b[key]
        if not (isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor)):
            if repr(ta) != repr(tb):
                differing.append(f"{key}: {ta!r} vs {tb!r}")
            continue
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            differing.append(f"{key}: {tuple(ta.shape)}/{ta.dtype} vs {tuple(tb.shape)}/{tb.dtype}")
            continue
        if not torch.equal(ta, tb):
            diff = float((ta.double() - tb.double()).abs().max())
            max_diff = max(max_diff, diff)
            differing.append(f"{key}: max |a-b| = {diff:.3g}")
    result = {
        "a": folder_a,
        "b": folder_b,
        "tensors": sum(1 for k in set(tensors_a) & set(tensors_b) if isinstance(tensors_a[k], torch.Tensor)),
        "model_tensors": sum(1 for k, v in tensors_a.items()
                             if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")),
        "differing": differing,
        "max_abs_diff": max_diff,
        "only_in_a": sorted(set(tensors_a) - set(tensors_b)),
        "only_in_b": sorted(set(tensors_b) - set(tensors_a)),
        "train_state_a": common_a.get("train_state"),
        "train_state_b": common_b.get("train_state"),
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
