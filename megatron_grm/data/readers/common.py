"""What every reader shares: record-level errors and the explicit bad-record policy.

A reader never drops a record silently. With ``on_error="fail"`` (the default) the first bad record
raises :class:`RecordError` naming file, line (or record index) and field. With ``on_error="skip"`` bad
records are collected in :attr:`ReadResult.errors`, counted, and logged once per file.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_grm.data.examples import Example, ExampleError

logger = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]


class RecordError(ValueError):
    """A bad input record: ``path:line: field 'x': why`` (``record`` instead of ``line`` for JSON arrays)."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        record: int | str | None = None,
        field_name: str | None = None,
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
        if record is not None:
            where += f": record {record}"
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {what}{message}")
        self.path = str(path)
        self.line = line
        self.record = record
        self.field = field_name
        self.reason = message


@dataclass
class ReadResult:
    """The examples a reader produced and the bad records it skipped (empty under ``on_error='fail'``).

    ``excluded`` counts well-formed source records left out *by design*, per reason (e.g. a math problem
    whose answer is not an integer), so that what a reader drops is always visible.
    """

    examples: list[Example] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    excluded: Counter[str] = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return len(self.errors)

    def counts_by_category(self) -> dict[str, int]:
        """Number of examples per ``Example.category``, sorted by category."""
        return dict(sorted(Counter(ex.category for ex in self.examples).items()))

    def extend(self, other: ReadResult) -> None:
        self.examples.extend(other.examples)
        self.errors.extend(other.errors)
        self.excluded.update(other.excluded)


UTF8_BOM = b"\xef\xbb\xbf"


def decode_utf8(data: bytes, path: str | Path, *, line: int | None = None, start_of_file: bool = False) -> str:
    """Decode one line (or a whole file) as UTF-8, dropping a BOM at the start of the file (``utf-8-sig``,
    as Windows editors write it). Bad bytes raise :class:`RecordError` with their line and byte offset
    instead of a bare ``UnicodeDecodeError`` that names no file."""
    skip = len(UTF8_BOM) if start_of_file and data.startswith(UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        bad = data[offset:exc.end + skip]
        if line is None:  # a whole file: say where, as line and byte offset
            line_of_offset = data.count(b"\n", 0, offset) + 1
            raise RecordError(path, f"not valid UTF-8: byte(s) {bad!r} at byte offset {offset} "
                                    f"({exc.reason})", line=line_of_offset) from None
        raise RecordError(path, f"not valid UTF-8: byte(s) {bad!r} at byte {offset} of the line ({exc.reason})",
                          line=line) from None


class SeenIds:
    """Where each example id was first read, across one file or several read together.

    Results, judgments and resume state are keyed by ``Example.id``, so two examples sharing an id would
    silently overwrite each other; a reader reports the second one instead, naming the first.
    """

    def __init__(self) -> None:
        self._first: dict[str, tuple[str, int | None, int | None]] = {}

    def duplicate_of(
        self, example_id: str, path: str | Path, *, line: int | None = None, record: int | None = None
    ) -> str | None:
        """Remember where ``example_id`` is; if it was seen before, return that place instead
        ("line 3" / "record 3" in the same file, "other.jsonl:3" / "other.json: record 3" elsewhere)."""
        first = self._first.get(example_id)
        if first is None:
            self._first[example_id] = (str(path), line, record)
            return None
        first_path, first_line, first_record = first
        if first_path == str(path):
            return f"line {first_line}" if first_line is not None else f"record {first_record}"
        return f"{first_path}:{first_line}" if first_line is not None else f"{first_path}: record {first_record}"


def check_example_id(value: object, field_name: str = "id") -> str:
    """An id given in a file: a string, or an integer written as its decimal string. Anything else
    (``null``, ``true``, an object) would become ``'None'``/``'True'``/``"{'a': 1}"`` — an error instead."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or isinstance(value, bool):
        shown = {None: "null", True: "true", False: "false"}[value]
    else:
        shown = type(value).__name__
    raise ExampleError(field_name, f"must be a string or an integer, got {shown}")


def check_policy(on_error: str) -> None:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")


def handle_bad_record(result: ReadResult, error: RecordError, on_error: OnError) -> None:
    """Apply the bad-record policy: raise, or keep the error so it is counted and reported."""
    if on_error == "fail":
        raise error
    result.errors.append(error)


def log_skipped(path: str | Path, result: ReadResult, first_error_index: int) -> None:
    """Log how many records of one file were skipped (with the first reason) — never silent."""
    skipped = result.errors[first_error_index:]
    if skipped:
        logger.warning("%s: skipped %d bad record(s); first: %s", path, len(skipped), skipped[0])


class DuplicateKeyError(ValueError):
    """A JSON object that names one key twice: parsers keep the last value without a word, so a record
    with "label" twice would be read with whichever came last."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key!r} appears twice in one object (JSON would keep only the last value)")
        self.key = key


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    record: dict[str, object] = {}
    for key, value in pairs:
        if key in record:
            raise DuplicateKeyError(key)
        record[key] = value
    return record


def load_record(text: str) -> object:
    """``json.loads`` for input records: an object with a repeated key raises :class:`DuplicateKeyError`."""
    return json.loads(text, object_pairs_hook=_refuse_repeated_keys)


def require_types(record: dict, where: str, types: dict[str, type]) -> None:
    """Each named field present with the given type, else a ValueError naming the place and the field."""
    for name, kind in types.items():
        value = record.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r}")


def json_object_lines(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``("<path>:<line>", object)`` for every non-blank line of a JSON-lines file (run outputs: sample,
    judgment and outcome files). Read as bytes so that a bad byte, invalid JSON, a repeated key or a line that
    is not an object is a ValueError naming file and line, never a bare ``UnicodeDecodeError`` or a value
    silently overwritten; a UTF-8 BOM at the start of the file (Windows editors) is dropped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, line=number, start_of_file=number == 1)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = load_record(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            except DuplicateKeyError as err:
                raise ValueError(f"{where}: field {err.key!r}: {err}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
