"""Reader for the RMB reward-model benchmark (Zhou et al., ICLR 2025), read in place from its folder.

Layout: ``<root>/Pairwise_set/<Goal>/.../<scenario>.json`` and ``<root>/BoN_set/<Goal>/.../<scenario>.json``,
each a JSON array of records with ``conversation_input`` (turns with ``role`` and ``content``) and
``category_path``. Pairwise records have ``chosen`` / ``reject`` (each ``{"llm_name", "answer"}``) and a
``pair_uid``; best-of-N records have ``bon_best`` and ``loser_list`` and a ``bon_uid``.

Each record becomes an example with the preferred response first (``label = 0``) — the file's order;
stages shuffle responses themselves. ``category`` keeps RMB's category path (e.g.
``Pairwise_set/Helpfulness/Chat/Discussion``) so metrics can break results down by set, goal and scenario.
RMB states no licence: use it for evaluation only and never copy it into the project.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from megatron_grm.data.examples import Example, ExampleError, Turn
from megatron_grm.data.readers.common import (
    OnError,
    ReadResult,
    RecordError,
    SeenIds,
    check_example_id,
    check_policy,
    decode_utf8,
    handle_bad_record,
    log_skipped,
)

Subset = Literal["pairwise", "bon"]
SUBSET_DIRS: dict[str, str] = {"pairwise": "Pairwise_set", "bon": "BoN_set"}
UID_FIELDS: dict[str, str] = {"pairwise": "pair_uid", "bon": "bon_uid"}


def rmb_files(root: str | Path, subset: Subset) -> list[Path]:
    """All JSON files of one RMB subset under ``root``, sorted (for a stable order)."""
    folder = Path(root) / SUBSET_DIRS[subset]
    if not folder.is_dir():
        where = "" if Path(root).is_absolute() else f"; a relative path is read from the current directory {Path.cwd()}"
        raise FileNotFoundError(
            f"RMB folder {folder} not found (expected {SUBSET_DIRS[subset]}/ under {root}{where}; an absolute "
            "path in the data spec, e.g. rmb:/data/rmb:pairwise, reads the same from any folder)"
        )
    return sorted(folder.rglob("*.json"))


def read_rmb(
    root: str | Path, subsets: tuple[Subset, ...] = ("pairwise", "bon"), on_error: OnError = "fail"
) -> ReadResult:
    """Read every file of the given RMB subsets (pairwise and/or best-of-N); a uid repeated in another
    file is a bad record naming both files."""
    check_policy(on_error)
    result = ReadResult()
    seen_ids = SeenIds()
    for subset in subsets:
        if subset not in SUBSET_DIRS:
            raise ValueError(f"unknown RMB subset {subset!r}; choose from {tuple(SUBSET_DIRS)}")
        for path in rmb_files(root, subset):
            result.extend(read_rmb_file(path, subset, on_error=on_error, seen_ids=seen_ids))
    return result


def read_rmb_file(
    path: str | Path, subset: Subset, on_error: OnError = "fail", seen_ids: SeenIds | None = None
) -> ReadResult:
    """Read one RMB JSON file; bad records are reported as ``file: record i: field 'x': why``.

    The file is one JSON document, so bad UTF-8 or bad JSON fails the whole file (naming line and byte
    offset); a BOM at its start is ignored. A repeated uid is a bad record naming the first record with
    it; pass one ``seen_ids`` to several calls to catch repeats across files too.
    """
    check_policy(on_error)
    path = Path(path)
    result = ReadResult()
    seen = SeenIds() if seen_ids is None else seen_ids
    text = decode_utf8(path.read_bytes(), path, start_of_file=True)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None
    if not isinstance(records, list):
        raise RecordError(path, f"expected a JSON array of records, got {type(records).__name__}")
    convert = _pairwise_example if subset == "pairwise" else _bon_example
    for index, record in enumerate(records):
        try:
            example = convert(record)
        except ExampleError as exc:
            handle_bad_record(
                result, RecordError(path, exc.reason, record=index, field_name=exc.field), on_error
            )
            continue
        first = seen.duplicate_of(example.id, path, record=index)
        if first is not None:
            uid = example.id.removeprefix(f"rmb/{subset}/")
            error = RecordError(path, f"duplicate uid {uid!r}: duplicate of {first}", record=index,
                                field_name=UID_FIELDS[subset])
            handle_bad_record(result, error, on_error)
            continue
        result.examples.append(example)
    log_skipped(path, result, 0)
    return result


def _field(record: Any, name: str) -> Any:
    if not isinstance(record, dict):
        raise ExampleError("<record>", f"must be a JSON object, got {type(record).__name__}")
    if name not in record:
        raise ExampleError(name, "missing")
    return record[name]


def _context(record: Any) -> tuple[Turn, ...]:
    turns = _field(record, "conversation_input")
    if not isinstance(turns, list):
        raise ExampleError("conversation_input", "must be a list of turns")
    out = []
    for i, turn in enumerate(turns):
        try:
            out.append(Turn(_field(turn, "role"), _field(turn, "content")))
        except ExampleError as exc:
            where = f"conversation_input[{i}]"
            raise ExampleError(
                where if exc.field == "<record>" else f"{where}.{exc.field}", exc.reason
            ) from None
    return tuple(out)


def _answer(value: Any, name: str) -> tuple[str, str]:
    if not isinstance(value, dict):
        raise ExampleError(name, "must be an object with llm_name and answer")
    answer = value.get("answer")
    if not isinstance(answer, str):
        raise ExampleError(f"{name}.answer", "missing or not a string")
    return answer, str(value.get("llm_name", ""))


def _category(record: Any) -> str:
    category = _field(record, "category_path")
    if not isinstance(category, str) or not category:
        raise ExampleError("category_path", "must be a non-empty string")
    return category


def _pairwise_example(record: Any) -> Example:
    chosen, chosen_model = _answer(_field(record, "chosen"), "chosen")
    rejected, rejected_model = _answer(_field(record, "reject"), "reject")
    uid = check_example_id(_field(record, "pair_uid"), "pair_uid")
    return Example(
        context=_context(record),
        responses=(chosen, rejected),
        label=0,
        source="rmb/pairwise",
        id=f"rmb/pairwise/{uid}",
        ranking=(0, 1),
        category=_category(record),
        metadata={"llm_names": [chosen_model, rejected_model]},
    )


def _bon_example(record: Any) -> Example:
    best, best_model = _answer(_field(record, "bon_best"), "bon_best")
    losers = _field(record, "loser_list")
    if not isinstance(losers, list) or not losers:
        raise ExampleError("loser_list", "must be a non-empty list")
    answers = [_answer(loser, f"loser_list[{i}]") for i, loser in enumerate(losers)]
    uid = check_example_id(_field(record, "bon_uid"), "bon_uid")
    return Example(
        context=_context(record),
        responses=(best, *(a for a, _ in answers)),
        label=0,
        source="rmb/bon",
        id=f"rmb/bon/{uid}",
        category=_category(record),
        metadata={"llm_names": [best_model, *(m for _, m in answers)]},
    )


def format_counts(result: ReadResult) -> str:
    """Examples per category and per subset (pairwise / best-of-N), one per line, for reports and logs."""
    counts = result.counts_by_category()
    lines = [f"{n:7d}  {category}" for category, n in counts.items()]
    for subset, folder in SUBSET_DIRS.items():
        total = sum(n for c, n in counts.items() if c.startswith(folder + "/"))
        lines.append(f"{total:7d}  total {subset}")
    if result.errors:
        lines.append(f"{result.num_skipped:7d}  bad records skipped")
    return "\n".join(lines)
