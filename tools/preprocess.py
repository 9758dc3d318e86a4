"""Preprocess prompt/response JSONL into Megatron-Core indexed datasets with response loss masks.

    python tools/preprocess.py --input data/a.jsonl data/b.jsonl --output-dir prep/sft \
        --tokenizer path/to/hf_model_folder --workers 8

Re-running the same command resumes an interrupted run (finished chunks are skipped). See
``megatron_grm.data.preprocess`` for the record format and the on-disk layout.
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

from megatron_grm.data.preprocess import PreprocessConfig, preprocess


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files, one record per line")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tokenizer", required=True,
                        help="HF folder, SentencePiece .model, .gguf, char_tokenizer.json folder, or 'char'")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=10_000, help="records per shard (unit of resume)")
    parser.add_argument("--max-tokens", type=int, default=None, help="reject longer records")
    parser.add_argument("--no-chat", action="store_true",
                        help="use string prompts verbatim instead of wrapping them as a user turn")
    parser.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (no merge)")
    parser.add_argument("--keep-shards", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in --output-dir")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)  # one line per shard otherwise
    config = PreprocessConfig(
        inputs=args.input, output_dir=args.output_dir, tokenizer=args.tokenizer, workers=args.workers,
        chunk_size=args.chunk_size, max_tokens=args.max_tokens, chat=not args.no_chat,
        keep_shards=args.keep_shards, progress=not args.no_progress, overwrite=args.overwrite)
    report = preprocess(config, max_chunks=args.max_chunks)
    print(f"chunks: {report.chunks_done_before} done before, {report.chunks_run} run now, "
          f"{report.chunks_total} total; {report.records_run} records in {report.seconds:.1f} s "
          f"({report.records_per_second:.0f} records/s)")
    if not report.complete:
        print("incomplete: re-run the same command to continue")
        return 0
    counts = report.counts
    print(f"complete: {counts['documents']} documents, {counts['tokens']} tokens "
          f"({counts['response_tokens']} response), {counts['rejects']} rejects -> {args.output_dir}")
    rejects = Path(args.output_dir) / "rejects.jsonl"
    if counts["rejects"]:
        print(f"rejected records are listed with file, line and field in {rejects}")
    if counts["documents"] == 0:
        print(f"error: the run produced no documents from {', '.join(map(str, args.input))}; nothing to "
              f"train on (inputs empty or every record rejected, see {rejects})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
