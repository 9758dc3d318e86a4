"""Hugging Face folder -> Megatron distributed checkpoint (Llama, Qwen2, Gemma-2), loadable at any TP/PP.

    python tools/convert_hf_to_mcore.py --hf HF_DIR --out CKPT_DIR [--tp N] [--pp N] [--dtype fp32|bf16]

With TP*PP > 1 the tool starts itself again under ``torch.distributed.run`` with TP*PP processes (or run
it under torchrun yourself with exactly TP*PP processes). The HF folder is checked completely first (config
fields, every tensor's name and shape); CKPT_DIR gets ``iter_0000000/`` (torch_dist, model_config.json and
the tokenizer in ``tokenizer/``) and ``latest``. A CKPT_DIR holding a training run's later checkpoints is
refused (its ``latest`` would move back to step 0) unless ``--force``. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_grm.models.conversion_launch import relaunch_under_torchrun, under_torchrun
from megatron_grm.models.hf_adapter import ConfigError
from megatron_grm.models.hf_convert import HFSource, check_conversion_target, open_hf
from megatron_grm.models.hf_io import CONFIG_FILE, TOKENIZER_FILES, HFFolderError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model folder")
    parser.add_argument("--out", required=True, help="checkpoint root to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written shards")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written shards")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype to store")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not require/copy tokenizer files")
    parser.add_argument("--force", action="store_true",
                        help="convert into a root that holds other checkpoints (its latest becomes step 0)")
    return parser.parse_args(argv)


def check_layout(src: HFSource, tp: int, pp: int) -> None:
    """Megatron splits heads, KV heads and the MLP evenly over TP ranks and layers evenly over PP stages;
    refuse a layout that cannot hold this model before any process starts (not as an assertion in each of them)."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp {tp} --pp {pp}: parallel sizes must be >= 1")
    cfg, where = src.cfg, src.folder / CONFIG_FILE
    splits = (("num_attention_heads", cfg.num_attention_heads, "--tp", tp),
              ("num_key_value_heads", cfg.num_query_groups, "--tp", tp),
              ("intermediate_size", cfg.ffn_hidden_size, "--tp", tp),
              ("num_hidden_layers", cfg.num_layers, "--pp", pp))
    for field, value, flag, size in splits:
        if value % size:
            raise ConfigError(f"{where}: {field}={value} is not divisible by {flag} {size}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    nproc = args.tp * args.pp
    try:
        src = open_hf(args.hf)  # fail fast, once, before any process is started
        if not args.no_tokenizer and not any((src.folder / f).is_file() for f in TOKENIZER_FILES):
            raise HFFolderError(f"{src.folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                "pass --no-tokenizer to convert the weights alone")
        check_layout(src, args.tp, args.pp)
        check_conversion_target(Path(args.out).resolve(), args.force)
    except (HFFolderError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not under_torchrun() and nproc > 1:
        return relaunch_under_torchrun(__file__, argv, nproc)

    from megatron_grm.models.hf_convert import convert_hf_to_mcore
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, dist_env, init_parallel

    env = dist_env()
    if env.world_size != nproc:
        print(f"error: started with {env.world_size} processes, but --tp {args.tp} --pp {args.pp} needs {nproc}",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format=f"[rank{env.rank}] %(levelname)s %(name)s: %(message)s")
    init_parallel(ParallelLayout(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    try:
        folder = convert_hf_to_mcore(src.folder, args.out, ParallelLayout(args.tp, args.pp), args.dtype,
                                     with_tokenizer=not args.no_tokenizer, force=args.force)
    finally:
        destroy_parallel()
    if env.rank == 0:
        print(f"wrote {folder} ({src.cfg.family}, {src.cfg.num_layers} layers, TP={args.tp} PP={args.pp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
