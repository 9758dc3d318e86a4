"""Check a conversion against transformers: same tokens through both models, logits compared.

    python tools/verify_conversion.py --hf HF_DIR --ckpt CKPT_DIR [--tol 1e-4]
        [--prompt TEXT ... [--chat] [--greedy-tokens 32]]

Runs transformers (fp32, eager attention) and our Megatron model (TP=1/PP=1, resharded from any layout)
on a seeded random token batch and on the given prompts. With --greedy-tokens N, also decodes N tokens
greedily on both sides (transformers' ``generate`` vs. a full-recompute argmax loop; EOS does not stop
either) and requires the same continuation. The last line printed is ``max_abs_logit_diff=<float>``;
the exit code is 1 when it exceeds --tol or a greedy continuation differs, and 2 when --hf or --ckpt
cannot be read (the message names the file).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (the reference)")
    parser.add_argument("--ckpt", required=True, help="Megatron checkpoint root or iter_* folder")
    parser.add_argument("--tol", type=float, default=1e-4, help="max allowed |logit difference| (fp32)")
    parser.add_argument("--batch", type=int, default=2, help="random token batch size")
    parser.add_argument("--seq", type=int, default=32, help="random token sequence length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn (chat template)")
    parser.add_argument("--greedy-tokens", type=int, default=0, help="also compare N greedy tokens per prompt")
    return parser.parse_args(argv)


def encode_prompts(hf_dir: str, prompts: list[str], chat: bool) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if chat:
        return [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for p in prompts]
    return [tok.encode(p) for p in prompts]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from megatron_grm.models import hf_parity as parity
    from megatron_grm.models.hf_convert import load_megatron_model, open_hf
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel

    torch.set_grad_enabled(False)
    try:  # bad input is exit 2 with the message, never 1 (which means: the models differ)
        open_hf(args.hf)  # names the broken file/field; transformers' own errors would not
        hf_model = parity.load_hf_model(args.hf)
    except (ValueError, KeyError, OSError) as exc:  # HFFolderError, ConfigError, FileNotFoundError, ...
        print(f"error (--hf): {exc}", file=sys.stderr)
        return 2
    init_parallel(ParallelLayout())
    try:
        try:
            model, cfg, _, folder = load_megatron_model(args.ckpt)
        except (ValueError, KeyError, OSError) as exc:  # CheckpointError, FileNotFoundError, bad JSON, ...
            print(f"error (--ckpt): {exc}", file=sys.stderr)
            return 2
        batches = [parity.random_tokens(cfg.vocab_size, args.batch, args.seq, args.seed)]
        prompts = encode_prompts(args.hf, args.prompt, args.chat) if args.prompt else []
        batches += [torch.tensor([p]) for p in prompts]
        worst = 0.0
        for tokens in batches:
            diff = (parity.megatron_logits(model, tokens, cfg.vocab_size) - parity.hf_logits(hf_model, tokens))
            # NaN or inf anywhere is a failure: max(0.0, nan) would be 0.0 and let a broken checkpoint pass.
            worst = max(worst, float(diff.abs().max()) if bool(diff.isfinite().all()) else math.inf)
        print(f"checkpoint {folder} ({cfg.family}) vs {args.hf}: {len(batches)} batch(es) compared")
        same = True
        if args.greedy_tokens:
            batch = parity.megatron_greedy(model, prompts, args.greedy_tokens, cfg.vocab_size)
            for i, (prompt, ours) in enumerate(zip(prompts, batch)):
                theirs = parity.hf_greedy(hf_model, prompt, args.greedy_tokens)
                same &= ours == theirs
                print(f"greedy[{i}] {'same' if ours == theirs else 'DIFFERENT'}: megatron={ours} "
                      f"transformers={theirs}")
    finally:
        destroy_parallel()
    print(f"max_abs_logit_diff={worst:.3e}")
    return 0 if worst <= args.tol and same else 1


if __name__ == "__main__":
    sys.exit(main())
