"""An evaluation's sample file (``<run_dir>/samples.jsonl``): one JSON line per draw, i.e. one generated
judgment of one example by one method (greedy, a sample at the evaluation's temperature, or the
LLM-as-a-judge baseline).

Draws are appended as they are made and the file is rewritten whole, sorted, at the end of a run, so a
restarted run, or another run given the file as ``eval.samples_in``, samples only what is missing. Every line
read back is checked: a malformed one is an error naming its line and field, and a draw may appear twice
only as the same judgment with its MetaRM score added, never as a second judgment silently replacing the
first.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from megatron_grm.data.readers.common import json_object_lines
from megatron_grm.parallel.distributed import barrier, is_rank0

if TYPE_CHECKING:
    from megatron_grm.stages.evaluate import Benchmark

log = logging.getLogger(__name__)

GREEDY, SAMPLE, JUDGE = "greedy", "sample", "judge"  # the methods a draw comes from


@dataclass
class Draw:
    """One generated judgment of one example: a line of the sample file.

    ``scores`` are in the example's original response order (the baseline's choice as one-hot scores),
    None when unparseable; ``permutation[k]`` is the response shown at position k.
    """

    benchmark: str
    example_id: str
    method: str  # greedy | sample | judge
    draw: int
    scores: list[int] | None
    permutation: list[int] | None = None
    text: str = ""
    meta_score: float | None = None


class DrawStore:
    """All draws by (benchmark, example, method), in draw order; what is already there is not resampled."""

    def __init__(self) -> None:
        self.draws: dict[tuple[str, str, str], dict[int, Draw]] = defaultdict(dict)
        self.others: list[dict[str, Any]] = []  # the run file's records of examples not evaluated this time

    def add(self, draws: Sequence[Draw]) -> None:
        for d in draws:
            self.draws[(d.benchmark, d.example_id, d.method)][d.draw] = d

    def get(self, benchmark: str, example_id: str, method: str) -> list[Draw]:
        by_index = self.draws.get((benchmark, example_id, method), {})
        out = []
        while len(out) in by_index:  # the contiguous prefix 0, 1, 2, ...
            out.append(by_index[len(out)])
        return out

    def all(self) -> list[Draw]:
        return [d for key in sorted(self.draws) for _, d in sorted(self.draws[key].items())]

    def read(self, path: str, benchmarks: Sequence[Benchmark], keep_others: bool = False,
             meta_scores: bool = True) -> int:
        """Add the draws of a sample file that belong to these benchmarks' examples; returns how many.
        ``keep_others``: hold the file's other records in :attr:`others` (the run's own file is rewritten,
        and a rerun over fewer examples must not delete the rest). ``meta_scores=False``: read the draws
        without their MetaRM logits, so the run's MetaRM scores them.

        Within one file a draw may appear again only as the evaluation's meta-scoring appends it: the same
        draw, now with its ``meta_score`` (or the very same line twice); the later line replaces the earlier.
        Any other second line of a draw is an error naming both lines, not the earlier judgment silently
        replaced (and gone for good once the file is rewritten). A draw of this file replaces one read from an
        earlier file (the run's own draws over ``eval.samples_in``)."""
        wanted = {(b.name, e.id): e.num_responses for b in benchmarks for e in b.examples}
        added, ignored = 0, 0
        unscored: set[tuple[str, str, str, int]] = set()
        seen: dict[tuple[str, str, str, int], tuple[str, dict[str, Any]]] = {}
        other_at: dict[tuple[str, str, str, int], int] = {}  # where a draw of another example is in self.others
        for where, record in json_object_lines(path):
            draw = _draw_from_record(record, where)
            key = (draw.benchmark, draw.example_id, draw.method, draw.draw)
            earlier = seen.get(key)
            if earlier is not None:
                _check_same_draw(earlier[1], record, earlier[0], where)
            seen[key] = (where, record)
            n = wanted.get((draw.benchmark, draw.example_id))
            if n is None:
                if earlier is None:
                    ignored += 1
                if keep_others and key in other_at:  # the later line replaces the earlier in the rewrite too
                    self.others[other_at[key]] = record
                elif keep_others:
                    other_at[key] = len(self.others)
                    self.others.append(record)
                continue
            if draw.scores is not None and len(draw.scores) != n:
                raise ValueError(f"{where}: {len(draw.scores)} scores for an example with {n} responses")
            if not meta_scores and draw.meta_score is not None:
                draw.meta_score = None
                unscored.add(key)
            self.add([draw])
            added += earlier is None
        if ignored:
            log.warning("%s: %s %d draws of examples not evaluated here", path,
                        "kept, unused," if keep_others else "ignored", ignored)
        if unscored:
            log.info("%s: %d imported MetaRM scores set aside; eval.metarm scores those draws", path, len(unscored))
        return added


def _check_same_draw(first: dict[str, Any], second: dict[str, Any], first_where: str, where: str) -> None:
    """A second line of one draw in one file is allowed only as the same judgment, the first line's
    ``meta_score`` null (it was appended again once meta-scored), or the same line again."""
    differing = sorted(k for k in set(first) | set(second)
                       if k != "meta_score" and first.get(k, None) != second.get(k, None))
    meta_first, meta_second = first.get("meta_score"), second.get("meta_score")
    if meta_first is not None and meta_first != meta_second:
        differing.append("meta_score")
    if differing:
        line = first_where.rsplit(":", 1)[-1]
        raise ValueError(f"{where}: field {differing[0]!r}: this draw ({second['benchmark']}, {second['example_id']}, "
                         f"{second['method']}, draw {second['draw']}) is already on line {line} with other "
                         f"{', '.join(repr(k) for k in differing)}; one draw has one judgment: remove one of the lines")


def _draw_from_record(record: dict[str, Any], where: str) -> Draw:
    """A line of a sample file as a :class:`Draw`, else a ValueError naming the line and the field (a
    non-integer ``draw`` would break the draw order, a ``true`` score would count as 1)."""
    for name in ("benchmark", "example_id", "method", "draw", "scores"):
        if name not in record:
            raise ValueError(f"{where}: field {name!r} is missing")
    for name in ("benchmark", "example_id", "method", "text"):
        if name in record and not isinstance(record[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {record[name]!r}")
    if record["method"] not in (GREEDY, SAMPLE, JUDGE):
        raise ValueError(f"{where}: field 'method' must be greedy, sample or judge, got {record['method']!r}")
    if type(record["draw"]) is not int or record["draw"] < 0:
        raise ValueError(f"{where}: field 'draw' must be a non-negative integer, got {record['draw']!r}")
    scores = record["scores"]
    if scores is not None and not (isinstance(scores, list) and all(type(x) is int for x in scores)):
        raise ValueError(f"{where}: field 'scores' must be a list of integers or null, got {scores!r}")
    perm = record.get("permutation")
    if perm is not None and not (isinstance(perm, list) and all(type(x) is int for x in perm)):
        raise ValueError(f"{where}: field 'permutation' must be a list of integers or null, got {perm!r}")
    meta = record.get("meta_score")
    if meta is not None and (isinstance(meta, bool) or not isinstance(meta, (int, float)) or not math.isfinite(meta)):
        raise ValueError(f"{where}: field 'meta_score' must be a finite number or null, got {meta!r}")
    known = set(Draw.__dataclass_fields__)
    return Draw(**{k: v for k, v in record.items() if k in known})


def drop_torn_tail(path: str, block: int = 1 << 16) -> int:
    """Cut a JSON-lines file back to its last complete line; returns the bytes cut. An append killed
    mid-write (SIGKILL after ``scancel``'s KillWait, the OOM killer, a lost node) leaves a line without
    its newline, which would fail every rerun and run into the next append."""
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
        return size - keep


def draw_line(draw: Draw) -> str:
    """A draw as a line of the sample file. A MetaRM logit that overflowed (NaN, inf: ranked last in
    this run) is written as null, so the file stays JSON and a rerun scores that draw again."""
    record = asdict(draw)
    if record["meta_score"] is not None and not math.isfinite(record["meta_score"]):
        record["meta_score"] = None
    return json.dumps(record, ensure_ascii=False) + "\n"


def append_draws(path: str, draws: Sequence[Draw]) -> None:
    """Rank 0 appends each new draw as it is made, so a killed run loses at most the line it was writing."""
    if is_rank0() and draws:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(draw_line(d) for d in draws)


def rewrite_draws(path: str, draws: Sequence[Draw], others: Sequence[dict[str, Any]] = ()) -> None:
    """The complete, sorted sample file (meta scores included), then the records of examples not
    evaluated this time as they were; replaced atomically."""
    if is_rank0():
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(draw_line(d) for d in draws)
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in others)
        os.replace(tmp, path)
    barrier()
