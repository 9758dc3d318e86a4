"""One string names where a stage's examples come from, so every stage and config reads data the same way.

    path/to/examples.jsonl          our JSONL format (docs/data_format.md)
    arithmetic:train:512            the demo task: split, number of examples[, seed]
    rmb:/path/to/rmb[:pairwise|bon] the RMB benchmark, read in place
    reasoning_gym:gsm_symbolic:200  verifiable math pairs from a reasoning-gym generator
    champ                           verifiable math pairs from champ-dataset

A list of such strings reads them all, in order (``data.train=[a.jsonl,rmb:/data/rmb:pairwise]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from megatron_grm.data.examples import Example
from megatron_grm.data.readers.common import ReadResult, SeenIds
from megatron_grm.data.readers.jsonl import default_id_prefixes

log = logging.getLogger(__name__)

GENERATED_KINDS = ("arithmetic", "rmb", "reasoning_gym", "champ")  # read_examples' spec kinds that are not a file


def load_examples(spec: str | Sequence[str], on_error: str = "fail", seed: int = 0) -> list[Example]:
    """Examples named by ``spec``, one string or a list of them (read in order); skipped bad records
    (``on_error='skip'``) are logged with their place. Example ids must be unique across the list too: a
    repeated one is an error naming both sources, or under ``on_error='skip'`` a skipped, logged record."""
    if isinstance(spec, str):
        return list(read_examples(spec, on_error, seed).examples)
    if not isinstance(spec, Sequence) or not spec or not all(isinstance(s, str) for s in spec):
        raise ValueError(f"data spec {spec!r}: expected a string or a non-empty list of strings")
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    jsonl_ids = SeenIds()  # JSONL files share it: a repeat in another file is named with both lines
    id_prefixes = default_id_prefixes([s for s in spec if _is_jsonl(s)])
    for source in spec:
        skipped = 0
        for example in read_examples(source, on_error, seed, jsonl_ids, id_prefixes.get(source)).examples:
            if example.id in first_seen:
                message = f"{source}: example id {example.id!r} is also in {first_seen[example.id]}"
                if on_error != "skip":
                    raise ValueError(f"{message}; ids must be unique across data sources")
                log.warning("skipped bad record: %s", message)
                skipped += 1
                continue
            first_seen[example.id] = source
            examples.append(example)
        if skipped:
            log.warning("%s: %d examples skipped, their ids are in an earlier source", source, skipped)
    return examples


def _is_jsonl(spec: str) -> bool:
    return str(spec).partition(":")[0] not in GENERATED_KINDS and Path(spec).is_file()


def read_examples(spec: str, on_error: str = "fail", seed: int = 0, seen_ids: SeenIds | None = None,
                  default_id_prefix: str | None = None) -> ReadResult:
    """:func:`load_examples` with the skipped bad records kept, for callers that report how many there were.
    ``seen_ids``: the ids a JSONL file's records must not repeat (other JSONL files read before it);
    ``default_id_prefix``: what a JSONL record without an id is named by (default: the file's stem)."""
    kind, _, rest = str(spec).partition(":")
    if kind == "arithmetic":
        from megatron_grm.data.arithmetic import arithmetic_examples

        parts = rest.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"data spec {spec!r}: expected arithmetic:<train|heldout>:<num>[:<seed>]")
        return ReadResult(arithmetic_examples(parts[0], int(parts[1]),
                                              seed=int(parts[2]) if len(parts) == 3 else seed))
    if kind == "rmb":
        from megatron_grm.data.readers.rmb import read_rmb

        root, _, subset = rest.rpartition(":") if rest.endswith((":pairwise", ":bon")) else (rest, "", "")
        result = read_rmb(root, (subset,) if subset else ("pairwise", "bon"), on_error=on_error)
    elif kind == "reasoning_gym":
        from megatron_grm.data.readers.verifiable_math import read_reasoning_gym

        dataset, _, size = rest.partition(":")
        result = read_reasoning_gym(dataset or "gsm_symbolic", size=int(size or 100), seed=seed, on_error=on_error)
    elif kind == "champ":
        from megatron_grm.data.readers.verifiable_math import read_champ

        result = read_champ(seed=seed, on_error=on_error)
    else:
        from megatron_grm.data.readers.jsonl import read_jsonl

        if not Path(spec).is_file():
            kinds = ", ".join(f"{kind}:" for kind in GENERATED_KINDS[:-1]) + f", {GENERATED_KINDS[-1]}"
            raise FileNotFoundError(f"data spec {spec!r}: no such file, and not one of {kinds}")
        result = read_jsonl(spec, on_error=on_error, seen_ids=seen_ids, default_id_prefix=default_id_prefix)
    for err in result.errors:
        log.warning("skipped bad record: %s", err)
    if result.errors:
        log.warning("%s: %d examples, %d bad records skipped", spec, len(result.examples), len(result.errors))
    if result.excluded:
        log.info("%s: %d examples; left out by design: %s", spec, len(result.examples),
                 ", ".join(f"{reason}: {n}" for reason, n in sorted(result.excluded.items())))
    if not result.examples:
        left_out = f"; {len(result.errors)} bad record(s) skipped" if result.errors else ""
        left_out += f"; left out by design: {dict(result.excluded)}" if result.excluded else ""
        raise ValueError(f"data spec {spec!r} gives no examples{left_out}")
    return result
