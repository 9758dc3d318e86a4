"""One rank (torchrun): re-saving a step that already has a checkpoint, killed between moving the old folder
aside and renaming the new one into place, still leaves ``latest`` resolving to a complete checkpoint of
that step; the next save completes and removes what was moved aside. Writes a JSON report."""

from __future__ import annotations

import argparse
import json
import os

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_grm.parallel import ParallelLayout, init_parallel
    from megatron_grm.train import checkpoint as ckpt

    init_parallel(ParallelLayout(), seed=0)

    def save(value: float) -> str:
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.full((4,), value))}
        return ckpt.save_checkpoint(args.root, 3, state, {"value": value}, {"step": 3, "value": value})

    def load(folder: str) -> float:
        loaded = ckpt.load_checkpoint(folder, {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4))})
        return float(loaded["w"][0])

    report: dict = {}
    save(1.0)
    real_rename = os.rename

    def crash_on_the_new_folder(src: str, dst: str) -> None:
        if str(src) == os.path.join(args.root, ckpt.checkpoint_name(3) + ".tmp"):
            raise KeyboardInterrupt("killed after the old folder was moved aside")
        real_rename(src, dst)

    os.rename = crash_on_the_new_folder
    try:
        save(2.0)
    except KeyboardInterrupt as e:
        report["crash"] = str(e)
    finally:
        os.rename = real_rename
    report["entries_after_crash"] = sorted(os.listdir(args.root))
    folder = ckpt.latest_checkpoint(args.root)
    report["resolved_after_crash"] = os.path.basename(folder)
    report["value_after_crash"] = load(folder)
    report["metadata_after_crash"] = ckpt.read_metadata(folder)["value"]

    save(3.0)
    report["entries_after_resave"] = sorted(os.listdir(args.root))
    report["value_after_resave"] = load(ckpt.latest_checkpoint(args.root))
    with open(args.out, "w") as f:
        json.dump(report, f)

    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
