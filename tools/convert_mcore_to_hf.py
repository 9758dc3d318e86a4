"""Megatron distributed checkpoint (any TP/PP layout) -> Hugging Face folder.

    python tools/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--max-shard-size 5GB] [--dtype fp32|bf16]

CKPT_DIR is a checkpoint root (with ``latest``) or one ``iter_*`` folder. Runs in one process: the
checkpoint is resharded into a TP=1/PP=1 model by dist_checkpointing. Writes config.json,
model.safetensors (sharded with an index above --max-shard-size), generation_config.json, the
tokenizer, and ``metarm_head.safetensors`` when the checkpoint carries a MetaRM head (docs/conversion.md).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 5GB, 500MB, 1048576)")
    return int(float(match.group(1)) * UNITS[match.group(2) or ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint root or iter_* folder")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                        help="split model.safetensors into shards with an index above this size (default 5GB)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="dtype of the written weights (default: that of the Hugging Face model the "
                             "checkpoint was converted from, else as stored)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export weights and config only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from megatron_grm.models.hf_adapter import ConfigError
    from megatron_grm.models.hf_convert import export_mcore_to_hf
    from megatron_grm.models.hf_io import HFFolderError
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, dist_env, init_parallel

    if dist_env().world_size != 1:
        print("error: convert_mcore_to_hf runs in one process (it reshards to TP=1/PP=1 itself)", file=sys.stderr)
        return 2
    init_parallel(ParallelLayout())
    try:
        out = export_mcore_to_hf(args.ckpt, args.out, args.max_shard_size, args.dtype,
                                 with_tokenizer=not args.no_tokenizer)
    except (HFFolderError, ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
