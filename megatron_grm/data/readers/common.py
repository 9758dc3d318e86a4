"""What every reader shares: record-level errors and the explicit bad-record policy.

A reader never drops a record silently. With ``on_error="fail"`` (the default) the first bad record
raises :class:`RecordError` naming file, line (or record index) and field. With ``on_error="skip"`` bad
records are collected in :attr:`ReadResult.errors`, counted, and logged once per file.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_grm.data.examples import Example

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
