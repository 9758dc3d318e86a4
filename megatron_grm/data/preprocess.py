"""JSONL prompt/response records → Megatron-Core indexed datasets with response loss masks.

Instruction data and sampled judgments both reduce to one record shape::

    {"prompt": "text" | [{"role", "content"}, ...], "response": "text"}
    {"messages": [..., {"role": "assistant", "content": "the response"}]}

Any other field (say a top-level ``"system"``) or a message key besides ``role`` and ``content`` makes
the record a reject (``rejects.jsonl``, naming the field) instead of being silently ignored. Input is
UTF-8; a BOM at the start of a file is ignored, anywhere else it is an error.

On-disk layout of an output folder (``PreprocessedDataset`` reads it)::

    manifest.json       written last: sources (sha256), tokenizer, settings, counts, rejects by field
    tokens.bin/.idx     IndexedDataset, one sequence per record: prompt + response ids (ends with EOS)
    loss_mask.bin/.idx  IndexedDataset (uint8), same lengths: 1 on response tokens, 0 on prompt tokens
    rejects.jsonl       one line per bad record: file, line, field, reason, text
    shards/             work area while running (removed after the merge unless keep_shards)

Why chunks: inputs are split into fixed-size line ranges; each worker turns one chunk into its own shard
and writes a ``.done.json`` marker only after the shard is complete. A restart skips chunks with a
marker and rewrites any half-written shard, so an interrupted run resumes without duplicates, and the
merge concatenates shards in input order, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from megatron_grm.data.readers.common import UTF8_BOM, DuplicateKeyError, load_record
from megatron_grm.data.tokenizer import (
    Message,
    TokenizationError,
    Tokenizer,
    load_tokenizer,
    validate_messages,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def _indexed() -> Any:
    """Megatron-Core's indexed_dataset module, imported on first use."""
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset

FORMAT = "megatron-grm/prompt-response/v1"
TOKENS = "tokens"
LOSS_MASK = "loss_mask"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SHARDS = "shards"
MASK_DTYPE = np.uint8
_SCAN_BLOCK = 1 << 24


class RecordError(ValueError):
    """A record that cannot become a training document; ``field`` is a JSON path ("$" = whole record)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _message_error(err: ValueError) -> RecordError:
    field_name, _, reason = str(err).partition(": ")
    return RecordError(field_name, reason)


PROMPT_FORM = ("prompt", "response")
MESSAGES_FORM = ("messages",)
MESSAGE_KEYS = ("role", "content")


def _check_keys(record: dict[str, Any], allowed: Sequence[str], where: str = "") -> None:
    """Unknown keys are errors: a misspelt "respones" or a "system" field the format has no place for
    must not silently vanish from the training data."""
    for key in record:
        if key not in allowed:
            raise RecordError(f"{where}{key}", f"unknown field (allowed: {', '.join(allowed)})")


def _check_message_keys(messages: Any, name: str) -> None:
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict):
                _check_keys(message, MESSAGE_KEYS, f"{name}[{i}].")


def parse_record(record: Any) -> tuple[str | list[Message], str]:
    """(prompt, response) of one record in either accepted form; raises :class:`RecordError`, also for
    a field or message key that neither form has."""
    if not isinstance(record, dict):
        raise RecordError("$", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record and "prompt" in record:
        raise RecordError("$", "has both 'prompt' and 'messages'; use one form")
    if "messages" in record:
        _check_keys(record, MESSAGES_FORM)
        _check_message_keys(record["messages"], "messages")
        try:
            messages = validate_messages(record["messages"])
        except ValueError as err:
            raise _message_error(err) from None
        last = len(messages) - 1
        if messages[last]["role"] != "assistant":
            raise RecordError(f"messages[{last}].role", "the last turn must be the assistant's response")
        if last == 0:
            raise RecordError("messages", "needs at least one turn before the final assistant turn")
        prompt: str | list[Message] = messages[:last]
        response = messages[last]["content"]
        if not response.strip():
            raise RecordError(f"messages[{last}].content", "empty response")
        return prompt, response
    if "prompt" not in record:
        raise RecordError("$", "expected 'prompt' and 'response', or a 'messages' list")
    _check_keys(record, PROMPT_FORM)
    prompt = record["prompt"]
    if isinstance(prompt, list):
        _check_message_keys(prompt, "prompt")
        try:
            prompt = validate_messages(prompt, "prompt")
        except ValueError as err:
            raise _message_error(err) from None
        if prompt[-1]["role"] == "assistant":
            raise RecordError(f"prompt[{len(prompt) - 1}].role",
                              "the prompt must end with a user or system turn")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("prompt", "expected a non-empty string or a list of chat messages")
    if "response" not in record:
        raise RecordError("response", "missing")
    response = record["response"]
    if not isinstance(response, str) or not response.strip():
        raise RecordError("response", "expected a non-empty string")
    return prompt, response


def encode_record(
    record: Any, tokenizer: Tokenizer, chat: bool = True, max_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, response mask) of one record; string prompts are chat-formatted unless ``chat`` is
    False or the record says ``"chat": false`` (a record's own boolean wins). Raises :class:`RecordError`
    naming the field at fault."""
    if isinstance(record, dict) and "chat" in record:
        record = dict(record)
        chat = record.pop("chat")
        if not isinstance(chat, bool):
            raise RecordError("chat", f"expected true or false, got {chat!r}")
    prompt, response = parse_record(record)
    try:
        ids, mask = tokenizer.encode_example(prompt, response, chat=chat)
    except TokenizationError as err:
        field_name = err.part
        if "messages" in record:
            last = len(record["messages"]) - 1
            field_name = f"messages[{last}].content" if err.part == "response" else "messages"
        raise RecordError(field_name, err.reason) from None
    if max_tokens is not None and len(ids) > max_tokens:
        raise RecordError("$", f"{len(ids)} tokens exceed max_tokens={max_tokens}")
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=MASK_DTYPE)


@dataclass
class PreprocessConfig:
    """What to convert and how; everything except ``workers``/``progress``/``keep_shards`` is part of the
    run's fingerprint, so a resume with different inputs or settings is refused rather than mixed."""

    inputs: Sequence[str | os.PathLike]
    output_dir: str | os.PathLike
    tokenizer: str | os.PathLike | Tokenizer
    workers: int = 1
    chunk_size: int = 10_000
    max_tokens: int | None = None
    chat: bool = True
    keep_shards: bool = False
    progress: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class Chunk:
    """A fixed range of lines of one input file; the unit of work, of output shards and of resume."""

    file_index: int
    index: int
    path: str
    start: int
    end: int
    first_line: int
    lines: int

    @property
    def name(self) -> str:
        return f"f{self.file_index:04d}-c{self.index:06d}"


@dataclass
class PreprocessReport:
    """What a call did: ``complete`` is False after a run stopped early with ``max_chunks``."""

    complete: bool
    chunks_total: int
    chunks_done_before: int
    chunks_run: int
    records_run: int
    tokens_run: int
    seconds: float
    output_dir: str
    manifest: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def records_per_second(self) -> float:
        return self.records_run / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Source:
    path: str
    sha256: str
    bytes: int
    lines: int
    chunks: list[tuple[int, int, int, int]]  # (start byte, end byte, first line, line count)


def scan_source(path: str | os.PathLike, chunk_size: int) -> _Source:
    """One pass over a file: its sha256, line count and the byte ranges of ``chunk_size``-line chunks."""
    digest = hashlib.sha256()
    newline_ends: list[np.ndarray] = []  # byte offset just after every newline
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):
            digest.update(block)
            newline_ends.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + offset + 1)
            offset += len(block)
    ends = np.concatenate(newline_ends) if newline_ends else np.zeros(0, dtype=np.int64)
    if offset and (ends.size == 0 or ends[-1] != offset):
        ends = np.append(ends, offset)  # last line without a trailing newline
    chunks = []
    for first in range(0, len(ends), chunk_size):
        last = min(first + chunk_size, len(ends)) - 1
        start = int(ends[first - 1]) if first else 0
        chunks.append((start, int(ends[last]), first + 1, last - first + 1))
    return _Source(str(path), digest.hexdigest(), offset, len(ends), chunks)


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, shard_dir: str, token_dtype: type, chat: bool,
                 max_tokens: int | None) -> None:
    _WORKER.update(tokenizer=tokenizer, shard_dir=Path(shard_dir), token_dtype=token_dtype, chat=chat,
                   max_tokens=max_tokens)


def _iter_lines(chunk: Chunk) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a chunk's lines; a UTF-8 BOM at the start of the file is dropped (the
    ``utf-8-sig`` convention, as the example readers do)."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    if chunk.start == 0 and data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    for i, raw in enumerate(data.split(b"\n")[: chunk.lines]):
        yield chunk.first_line + i, raw.rstrip(b"\r")


def _decode_line(raw: bytes) -> Any:
    """One line's JSON value. The bytes are decoded as UTF-8 here (``json.loads`` would guess UTF-16 or
    accept a BOM on any line), so bad bytes are named as such."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("$", f"not valid UTF-8: byte(s) {raw[err.start:err.end]!r} at byte {err.start} of "
                               f"the line ({err.reason})") from None
    try:
        return load_record(text)
    except json.JSONDecodeError as err:
        raise RecordError("$", f"not valid JSON ({err})") from None
    except DuplicateKeyError as err:
        raise RecordError(err.key, str(err)) from None


def _convert_chunk(chunk: Chunk) -> dict[str, Any]:
    """Worker: one chunk → one shard pair + rejects file, then the done marker (last, atomically)."""
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    shard = _WORKER["shard_dir"] / chunk.name
    token_builder = _indexed().IndexedDatasetBuilder(f"{shard}.{TOKENS}.bin", dtype=_WORKER["token_dtype"])
    mask_builder = _indexed().IndexedDatasetBuilder(f"{shard}.{LOSS_MASK}.bin", dtype=MASK_DTYPE)
    stats: Counter[str] = Counter()
    by_field: Counter[str] = Counter()
    with open(f"{shard}.{REJECTS}", "w") as rejects:
        for line_no, raw in _iter_lines(chunk):
            if not raw.strip():
                stats["blank_lines"] += 1
                continue
            stats["records"] += 1
            try:
                record = _decode_line(raw)
                ids, mask = encode_record(record, tokenizer, _WORKER["chat"], _WORKER["max_tokens"])
            except RecordError as err:
                stats["rejects"] += 1
                by_field[err.field] += 1
                text = raw[:500].decode("utf-8", errors="replace")
                rejects.write(json.dumps({"file": chunk.path, "line": line_no, "field": err.field,
                                          "reason": err.reason, "text": text}) + "\n")
                continue
            token_builder.add_document(ids, [len(ids)])
            mask_builder.add_document(mask, [len(mask)])
            stats["documents"] += 1
            stats["tokens"] += len(ids)
            stats["response_tokens"] += int(mask.sum())
    token_builder.finalize(f"{shard}.{TOKENS}.idx")
    mask_builder.finalize(f"{shard}.{LOSS_MASK}.idx")
    result = {"chunk": chunk.name, "lines": chunk.lines, **stats, "rejects_by_field": dict(by_field)}
    _write_json_atomic(Path(f"{shard}.done.json"), result)
    return result


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _fingerprint(sources: list[_Source], tokenizer: Tokenizer, config: PreprocessConfig) -> str:
    key = {"format": FORMAT, "sources": [s.sha256 for s in sources],
           "tokenizer": tokenizer.describe()["sha256"], "chunk_size": config.chunk_size,
           "max_tokens": config.max_tokens, "chat": config.chat}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _clear_outputs(out: Path) -> None:
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    for name in (MANIFEST, REJECTS, *(f"{p}.{s}" for p in (TOKENS, LOSS_MASK) for s in ("bin", "idx"))):
        (out / name).unlink(missing_ok=True)


def preprocess(config: PreprocessConfig, max_chunks: int | None = None) -> PreprocessReport:
    """Convert ``config.inputs`` into ``config.output_dir``, resuming a previous partial run.

    ``max_chunks`` stops after converting that many pending chunks (no merge): a bounded slice of work
    for schedulers with time limits, and how tests simulate an interruption.
    """
    t0 = time.perf_counter()
    if config.chunk_size <= 0 or config.workers <= 0:
        raise ValueError("chunk_size and workers must be positive")
    out = Path(config.output_dir)
    tokenizer = load_tokenizer(config.tokenizer)
    sources = [scan_source(p, config.chunk_size) for p in config.inputs]
    fingerprint = _fingerprint(sources, tokenizer, config)
    shard_dir = out / SHARDS
    manifest_path, plan_path = out / MANIFEST, shard_dir / "plan.json"
    if config.overwrite:
        _clear_outputs(out)
    for path in (manifest_path, plan_path):
        if path.exists() and json.loads(path.read_text())["fingerprint"] != fingerprint:
            raise ValueError(f"{path}: this folder holds a run with other inputs, tokenizer or settings; "
                             "use a new output folder or overwrite=True (--overwrite)")
    chunks = [Chunk(fi, ci, s.path, *c) for fi, s in enumerate(sources) for ci, c in enumerate(s.chunks)]
    if manifest_path.exists():
        shutil.rmtree(shard_dir, ignore_errors=True)
        manifest = json.loads(manifest_path.read_text())
        log.info("%s is already complete (fingerprint %s)", out, fingerprint[:12])
        return PreprocessReport(True, len(chunks), len(chunks), 0, 0, 0, time.perf_counter() - t0, str(out),
                                manifest, manifest["counts"])
    shard_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(plan_path, {"fingerprint": fingerprint, "chunks": [asdict(c) for c in chunks]})

    done = {c.name for c in chunks if (shard_dir / f"{c.name}.done.json").exists()}
    pending = [c for c in chunks if c.name not in done]
    if done:
        log.info("resuming %s: %d of %d chunks already converted", out, len(done), len(chunks))
    if max_chunks is not None:
        pending = pending[:max_chunks]
    token_dtype = _indexed().DType.optimal_dtype(tokenizer.vocab_size)
    init_args = (tokenizer, str(shard_dir), token_dtype, config.chat, config.max_tokens)
    records_run = tokens_run = 0
    total_lines = sum(s.lines for s in sources)
    done_lines = sum(c.lines for c in chunks if c.name in done)
    with tqdm(total=total_lines, initial=done_lines, unit="rec", disable=not config.progress,
              desc="preprocess") as bar:
        for stats in _run_chunks(pending, config.workers, init_args):
            records_run += stats.get("records", 0)
            tokens_run += stats.get("tokens", 0)
            bar.update(stats["lines"])
    complete = len(done) + len(pending) == len(chunks)
    manifest = _merge(out, chunks, sources, tokenizer, config, fingerprint, token_dtype) if complete else None
    return PreprocessReport(complete, len(chunks), len(done), len(pending), records_run, tokens_run,
                            time.perf_counter() - t0, str(out), manifest,
                            manifest["counts"] if manifest else {})


def _run_chunks(pending: list[Chunk], workers: int, init_args: tuple) -> Iterator[dict[str, Any]]:
    if workers == 1 or len(pending) <= 1:
        _init_worker(*init_args)
        yield from map(_convert_chunk, pending)
        return
    # fork: workers inherit the loaded tokenizer and Megatron-Core import instead of redoing them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    with context.Pool(min(workers, len(pending)), initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap_unordered(_convert_chunk, pending, chunksize=1)


def _append_shard(builder: IndexedDatasetBuilder, prefix: Path) -> None:
    """``IndexedDatasetBuilder.add_index`` without its per-call ``gc.collect()``, which costs ~0.2 s
    with torch loaded — minutes over thousands of shards."""
    shard = _indexed().IndexedDataset(str(prefix), mmap=False)  # an all-rejects chunk has an empty .bin: no mmap
    if shard.index.dtype != builder.dtype:
        raise ValueError(f"{prefix}: dtype {shard.index.dtype} differs from {builder.dtype}")
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(shard.sequence_lengths.tolist())
    builder.document_indices.extend((offset + shard.document_indices[1:]).tolist())
    del shard
    with open(f"{prefix}.bin", "rb") as f:
        shutil.copyfileobj(f, builder.data_file)


def _merge(out: Path, chunks: list[Chunk], sources: list[_Source], tokenizer: Tokenizer,
           config: PreprocessConfig, fingerprint: str, token_dtype: type) -> dict[str, Any]:
    """Concatenate shards in input order, write rejects and, last, the manifest."""
    shard_dir = out / SHARDS
    counts: Counter[str] = Counter()
    by_field: Counter[str] = Counter()
    per_source: list[Counter[str]] = [Counter() for _ in sources]  # records, documents per input
    token_builder = _indexed().IndexedDatasetBuilder(str(out / f"{TOKENS}.bin"), dtype=token_dtype)
    mask_builder = _indexed().IndexedDatasetBuilder(str(out / f"{LOSS_MASK}.bin"), dtype=MASK_DTYPE)
    with open(out / REJECTS, "wb") as rejects:
        for chunk in chunks:
            stats = json.loads((shard_dir / f"{chunk.name}.done.json").read_text())
            by_field.update(stats.pop("rejects_by_field"))
            counts.update({k: v for k, v in stats.items() if isinstance(v, int)})
            per_source[chunk.file_index].update({k: stats.get(k, 0) for k in ("records", "documents")})
            _append_shard(token_builder, shard_dir / f"{chunk.name}.{TOKENS}")
            _append_shard(mask_builder, shard_dir / f"{chunk.name}.{LOSS_MASK}")
            with open(shard_dir / f"{chunk.name}.{REJECTS}", "rb") as f:
                shutil.copyfileobj(f, rejects)
    token_builder.finalize(str(out / f"{TOKENS}.idx"))
    mask_builder.finalize(str(out / f"{LOSS_MASK}.idx"))
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "created_unix": int(time.time()),
        "sources": [{"path": s.path, "sha256": s.sha256, "bytes": s.bytes, "lines": s.lines,
                     "records": n["records"], "documents": n["documents"]} for s, n in zip(sources, per_source)],
        "tokenizer": tokenizer.describe(),
        "settings": {"chunk_size": config.chunk_size, "max_tokens": config.max_tokens, "chat": config.chat},
        "layout": {"tokens": TOKENS, "loss_mask": LOSS_MASK, "rejects": REJECTS,
                   "token_dtype": np.dtype(token_dtype).name, "loss_mask_dtype": np.dtype(MASK_DTYPE).name},
        "counts": {k: counts.get(k, 0) for k in
                   ("lines", "blank_lines", "records", "documents", "tokens", "response_tokens", "rejects")},
        "rejects_by_field": dict(sorted(by_field.items())),
        "chunks": len(chunks),
    }
    for source, n in zip(sources, per_source):
        if n["records"] == 0:
            log.warning("%s: input has no records (empty or only blank lines)", source.path)
        elif n["documents"] == 0:
            log.warning("%s: all %d records were rejected (see %s)", source.path, n["records"], out / REJECTS)
    _write_json_atomic(out / MANIFEST, manifest)
    if not config.keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return manifest


class PreprocessedDataset:
    """Reads a preprocessed folder: ``ds[i]`` is (token ids, response mask) as numpy arrays."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest}: missing; the folder is not a finished preprocessing run")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("counts", {}).get("documents") == 0:
            raise ValueError(f"{manifest}: the run produced no documents (see its rejects file)")
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest}: field 'format' is {self.manifest.get('format')!r}, "
                             f"expected {FORMAT!r}")
        self.tokens = _indexed().IndexedDataset(str(self.folder / self.manifest["layout"]["tokens"]))
        self.loss_mask = _indexed().IndexedDataset(str(self.folder / self.manifest["layout"]["loss_mask"]))
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_mask.sequence_lengths):
            raise ValueError(f"{self.folder}: tokens and loss_mask sequence lengths differ")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[int(index)], self.loss_mask[int(index)]

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths
