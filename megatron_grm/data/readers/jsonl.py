"""Our own JSONL example format: the one users write (documented here and in docs/data_format.md).

One JSON object per line; blank lines are ignored. Fields:

=====================  ========  ==============================================================
field                  required  meaning
=====================  ========  ==============================================================
``context``            yes       list of ``{"role": "system"|"user"|"assistant", "content": str}``,
                                 last turn ``"user"`` (the query); a plain string is shorthand for
                                 one user turn
``responses``          yes       list of n >= 1 strings
``label``              yes       n >= 2: 0-based index of the best response; n = 1: 0 or 1
``ranking``            no        n >= 2: all response indices, best first (``ranking[0] == label``)
``preference_strength`` no       number >= 0: how much better the best response is
``category``           no        '/'-separated path for per-category metrics (default ``""``)
``source``             no        dataset name (default: the file's stem)
``id``                 no        unique id, a string or an integer (default ``"<file stem>:<line>"``)
``metadata``           no        object, kept as is and never interpreted
=====================  ========  ==============================================================

Example line::

    {"id": "q1", "context": [{"role": "user", "content": "What is 2+2?"}],
     "responses": ["4", "5"], "label": 0}

Unknown fields are errors (a misspelt ``"lable"`` must not silently drop the label), and so is an id
that an earlier line of the file already used. The file is UTF-8; a leading BOM is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_grm.data.examples import Example, ExampleError, Turn
from megatron_grm.data.readers.common import (
    DuplicateKeyError,
    OnError,
    ReadResult,
    RecordError,
    SeenIds,
    check_example_id,
    check_policy,
    decode_utf8,
    handle_bad_record,
    load_record,
    log_skipped,
)

REQUIRED_FIELDS = ("context", "responses", "label")
OPTIONAL_FIELDS = ("ranking", "preference_strength", "category", "source", "id", "metadata")


def example_from_record(record: Any, *, default_source: str, default_id: str) -> Example:
    """Build an :class:`Example` from one decoded JSON object; raises :class:`ExampleError` naming
    the field."""
    if not isinstance(record, dict):
        raise ExampleError("<record>", f"must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ExampleError(
            unknown[0], f"unknown field (allowed: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})"
        )
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise ExampleError(name, "missing")
    responses = record["responses"]
    if not isinstance(responses, list):
        raise ExampleError("responses", f"must be a list of strings, got {type(responses).__name__}")
    ranking = record.get("ranking")
    if ranking is not None and not isinstance(ranking, list):
        raise ExampleError("ranking", f"must be a list of indices, got {type(ranking).__name__}")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ExampleError("metadata", f"must be an object, got {type(metadata).__name__}")
    return Example(
        context=parse_context(record["context"]),
        responses=tuple(responses),
        label=record["label"],
        source=record.get("source", default_source),
        id=check_example_id(record["id"]) if "id" in record else default_id,
        ranking=None if ranking is None else tuple(ranking),
        preference_strength=record.get("preference_strength"),
        category=record.get("category", ""),
        metadata=metadata,
    )


def parse_context(value: Any, field_name: str = "context") -> tuple[Turn, ...]:
    """A context given as a list of ``{"role", "content"}`` objects, or a string (one user turn)."""
    if isinstance(value, str):
        return (Turn("user", value),)
    if not isinstance(value, list):
        raise ExampleError(field_name, f"must be a list of turns or a string, got {type(value).__name__}")
    turns = []
    for i, turn in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(turn, dict):
            raise ExampleError(where, f"must be an object with role and content, got {type(turn).__name__}")
        for key in ("role", "content"):
            if key not in turn:
                raise ExampleError(f"{where}.{key}", "missing")
        unknown = sorted(set(turn) - {"role", "content"})
        if unknown:  # e.g. a "name" or "tool_calls" the prompt cannot show: an error, not a silent drop
            raise ExampleError(f"{where}.{unknown[0]}", "unknown field (allowed: role, content)")
        try:
            turns.append(Turn(turn["role"], turn["content"]))
        except ExampleError as exc:
            raise ExampleError(f"{where}.{exc.field}", exc.reason) from None
    return tuple(turns)


def read_jsonl(path: str | Path, on_error: OnError = "fail", seen_ids: SeenIds | None = None,
               default_id_prefix: str | None = None) -> ReadResult:
    """Read examples from one JSONL file in our format. Bad lines raise :class:`RecordError`
    (``file:line: field 'x': why``) or, with ``on_error="skip"``, are counted in the result's errors.

    Lines are decoded one by one (a BOM at the start of the file is dropped), so a line of bad UTF-8 is
    one bad record, not a crash that loses the rest. A repeated ``id`` is a bad record naming the line
    that had it first; pass one ``seen_ids`` to several calls to catch repeats across files too. A record
    without an ``id`` gets ``<default_id_prefix>:<line>``, the prefix the file's stem unless given
    (:func:`default_id_prefixes` tells same-named files of one list apart).
    """
    check_policy(on_error)
    path = Path(path)
    prefix = path.stem if default_id_prefix is None else default_id_prefix
    result = ReadResult()
    seen = SeenIds() if seen_ids is None else seen_ids
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                line = decode_utf8(raw, path, line=line_number, start_of_file=line_number == 1)
            except RecordError as error:
                handle_bad_record(result, error, on_error)
                continue
            if not line.strip():
                continue
            try:
                record = load_record(line)
            except json.JSONDecodeError as exc:
                error = RecordError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=line_number)
                handle_bad_record(result, error, on_error)
                continue
            except DuplicateKeyError as exc:
                handle_bad_record(result, RecordError(path, str(exc), line=line_number, field_name=exc.key), on_error)
                continue
            try:
                example = example_from_record(
                    record, default_source=path.stem, default_id=f"{prefix}:{line_number}"
                )
            except ExampleError as exc:
                handle_bad_record(
                    result, RecordError(path, exc.reason, line=line_number, field_name=exc.field), on_error
                )
                continue
            first = seen.duplicate_of(example.id, path, line=line_number)
            if first is not None:
                error = RecordError(path, f"duplicate id {example.id!r}: duplicate of {first}", line=line_number,
                                    field_name="id")
                handle_bad_record(result, error, on_error)
                continue
            result.examples.append(example)
    log_skipped(path, result, 0)
    return result


def default_id_prefixes(paths: Sequence[str | Path]) -> dict[str, str]:
    """The prefix of each JSONL file's default ids when the files are read as one list: the file's stem, or,
    where files of the list share a stem, its path from the folder they share (``a/train`` and
    ``b/train``; with the extension where only that differs). Without this, two ``train.jsonl`` files without
    ids would give the same ``train:1`` twice, a duplicate id. A file named twice keeps one prefix (its
    records are then duplicates, as they should be)."""
    resolved = {str(p): Path(p).resolve() for p in paths}
    by_stem: dict[str, set[Path]] = {}
    for full in resolved.values():
        by_stem.setdefault(full.stem, set()).add(full)
    prefixes = {}
    for name, full in resolved.items():
        files = by_stem[full.stem]
        if len(files) == 1:
            prefixes[name] = full.stem
            continue
        root = Path(os.path.commonpath([str(f) for f in files]))
        stems = [f.relative_to(root).with_suffix("").as_posix() for f in files]
        relative = full.relative_to(root)
        unique = len(set(stems)) == len(stems)
        prefixes[name] = (relative.with_suffix("") if unique else relative).as_posix()
    return prefixes


def example_to_record(example: Example) -> dict[str, Any]:
    """The JSONL object for an example (the inverse of :func:`example_from_record`)."""
    record: dict[str, Any] = {
        "id": example.id,
        "source": example.source,
        "context": [{"role": t.role, "content": t.content} for t in example.context],
        "responses": list(example.responses),
        "label": example.label,
    }
    if example.ranking is not None:
        record["ranking"] = list(example.ranking)
    if example.preference_strength is not None:
        record["preference_strength"] = example.preference_strength
    if example.category:
        record["category"] = example.category
    if example.metadata:
        record["metadata"] = example.metadata
    return record


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write examples in our JSONL format; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(example_to_record(ex), ensure_ascii=False) + "\n")
            count += 1
    return count
