"""RFT's sample shards on disk: one JSONL line per sampled judgment, kept or not (docs/rft.md).

Rejective sampling writes a shard of ``rft.shard_size`` examples at a time (the file fsynced and renamed,
then its ``.done`` marker), so a rerun never resamples a finished shard; ``manifest.json`` records what the
shards are samples of, and a rerun with other settings is refused. SFT reads them back, each line checked,
and MetaRM trains on them too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from megatron_grm.data.examples import Example
from megatron_grm.data.readers.common import json_object_lines
from megatron_grm.data.tokenizer import TokenizationError, Tokenizer
from megatron_grm.parallel.distributed import barrier, is_rank0
from megatron_grm.rollout.judgments import JudgmentSample
from megatron_grm.train import checkpoint as ckpt

MANIFEST = "manifest.json"


def judgment_record(example: Example, example_index: int, shard: int, sample_index: int, judgment: JudgmentSample,
                    kept: bool, too_easy: bool, chat: bool) -> dict[str, Any]:
    """One line of a sample shard (docs/rft.md)."""
    return {
        "example_id": example.id, "example_index": example_index, "shard": shard, "sample_index": sample_index,
        "hinted": judgment.hinted, "permutation": judgment.permutation, "prompt": judgment.prompt,
        "grm_prompt": judgment.grm_prompt, "chat": chat,
        "text": judgment.text, "scores": judgment.scores, "parse_error": judgment.parse_error,
        "correct": judgment.correct, "kept": kept, "too_easy": too_easy, "label": example.label,
        "num_responses": example.num_responses, "num_tokens": len(judgment.token_ids),
        "finish_reason": judgment.finish_reason,
    }


def kept_judgment_ids(tokenizer: Tokenizer, record: dict[str, Any], where: str = "record"
                      ) -> tuple[list[int], list[int]]:
    """(ids, response mask) SFT trains on for a kept judgment: its plain GRM prompt, chat-formatted as it
    was sampled, with the judged conversation read as data (``encode_grm_prompt``). Shards written before
    records carried ``grm_prompt`` hold only the formatted text, which is encoded as it stands. A record
    that cannot be encoded is an error naming ``where`` it came from."""
    try:
        if "grm_prompt" in record:
            return tokenizer.encode_example(record["grm_prompt"], record["text"], chat=bool(record["chat"]),
                                            literal=True)
        return tokenizer.encode_example(record["prompt"], record["text"], chat=False)
    except TokenizationError as err:
        field = "text" if err.part == "response" else ("grm_prompt" if "grm_prompt" in record else "prompt")
        raise ValueError(f"{where}: field {field!r}: {err.reason}") from err


def shard_file(samples_dir: str, shard: int) -> str:
    return os.path.join(samples_dir, f"shard_{shard:05d}.jsonl")


def done_marker(samples_dir: str, shard: int) -> str:
    return os.path.join(samples_dir, f"shard_{shard:05d}.done")


def check_manifest(samples_dir: str, manifest: dict[str, Any]) -> None:
    """Record what the shards are samples *of* (rank 0 writes it); refuse to resume into a folder that was
    sampled with other settings, on every rank."""
    path = os.path.join(samples_dir, MANIFEST)
    manifest = json.loads(json.dumps(manifest))  # compare as JSON (tuples are lists there)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {manifest.get(k)!r}" for k in changed)
            raise ValueError(f"{samples_dir} holds samples drawn with other settings ({details}); "
                             "use another rft.samples_dir or restore the settings")
    elif is_rank0():
        os.makedirs(samples_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    barrier()


def write_shard(samples_dir: str, shard: int, records: Sequence[dict[str, Any]]) -> None:
    """The shard file (written to .tmp, fsynced, renamed), then its ``.done`` marker."""
    tmp = shard_file(samples_dir, shard) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, shard_file(samples_dir, shard))
    ckpt.write_atomically(done_marker(samples_dir, shard), f"{len(records)}\n")  # fsyncs the folder: both names



def read_shards(samples_dir: str) -> list[dict[str, Any]]:
    """Every judgment record of a finished sampling run, in example order; a malformed line is an error
    naming its shard file, line and field (:func:`check_shard_record`)."""
    path = os.path.join(samples_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run rft.phase=sample (or all) first")
    with open(path) as f:
        num_shards = int(json.load(f)["num_shards"])
    missing = [k for k in range(num_shards) if not os.path.exists(done_marker(samples_dir, k))]
    if missing:
        raise RuntimeError(f"{len(missing)} of {num_shards} shards in {samples_dir} are unfinished (first: "
                           f"{missing[0]}); run rft.phase=sample (or all) to finish them")
    records: list[dict[str, Any]] = []
    for k in range(num_shards):
        for where, record in json_object_lines(shard_file(samples_dir, k)):
            check_shard_record(record, where, k)
            records.append(record)
    return records


# A shard record's fields (docs/rft.md) as (types, required). ``grm_prompt`` and ``chat`` came later: older
# shards lack both. ``int`` never admits a bool (``true`` is no example index).
_SHARD_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "example_id": ((str,), True), "example_index": ((int,), True), "shard": ((int,), True),
    "sample_index": ((int,), True), "hinted": ((bool,), True), "permutation": ((list,), False),
    "prompt": ((str,), True), "grm_prompt": ((str,), False), "chat": ((bool,), False), "text": ((str,), True),
    "scores": ((list, type(None)), True), "parse_error": ((str, type(None)), False), "correct": ((bool,), True),
    "kept": ((bool,), True), "too_easy": ((bool,), True), "label": ((int,), False),
    "num_responses": ((int,), False), "num_tokens": ((int,), False), "finish_reason": ((str,), False),
}


def check_shard_record(record: dict[str, Any], where: str, shard: int) -> None:
    """A shard line as :func:`judgment_record` writes it, else a ValueError naming ``where`` and the field:
    the statistics and the SFT set read these fields, and a bare KeyError or a ``"false"`` counted as true
    would name no line."""
    for name, (kinds, required) in _SHARD_FIELDS.items():
        if name not in record:
            if required:
                raise ValueError(f"{where}: field {name!r} is missing")
            continue
        value = record[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{where}: field {name!r} must be {wanted}, got {value!r}")
    for name in ("scores", "permutation"):
        if isinstance(record.get(name), list) and not all(type(x) is int for x in record[name]):
            raise ValueError(f"{where}: field {name!r} must be a list of integers, got {record[name]!r}")
    if "grm_prompt" in record and "chat" not in record:
        raise ValueError(f"{where}: field 'chat' is missing (a record with 'grm_prompt' says how it was formatted)")
    if record["shard"] != shard:
        raise ValueError(f"{where}: field 'shard' is {record['shard']}, but the record is in shard {shard}")
