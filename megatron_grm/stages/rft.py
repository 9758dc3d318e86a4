"""Stage 1 of SPCT: rejective fine-tuning (RFT), paper §3.2 with Eq. 10; hyper-parameters from App. C.1.

    examples ──N judgments each (responses shuffled)──▶ Eq. 10 ──▶ keep the correct ones, drop examples whose
             N judgments are all correct (too easy); an example with none correct gets one *hinted* judgment
             ("The best response is: Response j"), kept if correct
             ──▶ <samples_dir>/shard_XXXXX.jsonl + .done   (resumable; MetaRM training reads them too)
    kept judgments + general instruction data ──▶ SFT, loss on the judgment tokens only ──▶ checkpoint

Sampling and training run in one job (``rft.phase=all``) or as two (``rft.phase=sample`` then
``rft.phase=train``). The sample record format is documented in docs/rft.md.

    torchrun --nproc-per-node 2 -m megatron_grm.stages.bootstrap     # the tiny demo's starting model
    torchrun --nproc-per-node 2 -m megatron_grm.stages.rft +experiment=rft_tiny   # trainer.load=runs/bootstrap/...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hydra
import numpy as np
import torch

from megatron_grm.data.arithmetic import digit_facts
from megatron_grm.data.blend import BlendedDataset
from megatron_grm.data.examples import Example
from megatron_grm.data.packing import collate_padded, pack_documents, plan_rows
from megatron_grm.data.readers.common import json_object_lines
from megatron_grm.data.sources import load_examples
from megatron_grm.data.tokenizer import TokenizationError, Tokenizer, load_tokenizer
from megatron_grm.parallel.distributed import barrier, is_rank0, true_on_any_rank
from megatron_grm.rollout.judgments import (
    PROMPT_TOO_LONG,
    JudgmentSample,
    report_too_long,
    sample_judgments,
    split_by_prompt_room,
)
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.stages.common import (
    CONF_DIR,
    prepare_run,
    prompt_record,
    prompt_template_mismatch,
    run_stage,
    tokenizer_name,
)
from megatron_grm.stages.heldout import heldout_accuracy
from megatron_grm.stages.sft import SupervisedObjective, read_sft_samples
from megatron_grm.train import checkpoint as ckpt
from megatron_grm.train.loop import Trainer
from megatron_grm.train.producers import Sample, SampleBatchProducer, global_batch_indices
from megatron_grm.train.signals import exit_for_requeue

log = logging.getLogger(__name__)

PHASES = ("sample", "train", "all")
MANIFEST = "manifest.json"
_FACTS_SPEC = re.compile(r"digit_facts:(\d+)(?::(\d+))?")


@dataclass
class RFTSettings:
    """The ``rft`` section of the config (conf/rft.yaml explains every field)."""

    phase: str = "all"
    num_samples: int = 3  # N_RFT, paper App. C.1
    hinted_fraction: float = 1.0  # of the examples with no correct judgment, the fraction sampled with the hint
    shard_size: int = 512
    samples_dir: str | None = None  # default <run_dir>/samples
    instruction_ratio: float = 0.0  # fraction of the SFT mix that is general instruction data
    variant: str = "default"
    chat: bool = True
    eval_before: bool = False  # held-out accuracy of the starting weights too (data.heldout)
    pad_multiple: int = 8
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingConfig fields
    rollout: dict[str, Any] = field(default_factory=dict)  # max_tokens_in_flight, max_batch_size, backend

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RFTSettings:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown rft field(s): {unknown}; known: {sorted(known)}")
        settings = cls(**values)
        if settings.phase not in PHASES:
            raise ValueError(f"rft.phase={settings.phase!r}; choose one of {PHASES}")
        if settings.num_samples < 1 or settings.shard_size < 1:
            raise ValueError("rft.num_samples and rft.shard_size must be >= 1")
        if not 0.0 <= settings.hinted_fraction <= 1.0:
            raise ValueError(f"rft.hinted_fraction={settings.hinted_fraction}; must be in [0, 1]")
        if not 0.0 <= settings.instruction_ratio < 1.0:
            raise ValueError(f"rft.instruction_ratio={settings.instruction_ratio}; must be in [0, 1)")
        return settings

    def sampling_config(self, seed: int) -> SamplingConfig:
        return SamplingConfig(**{**self.sampling, "seed": seed})


# ------------------------------------------------------------------------------------------------ data
def read_instruction_samples(spec: str, tokenizer: Tokenizer, seq_length: int, bad_records: str = "fail",
                             chat: bool = False) -> list[Sample]:
    """General instruction data for the SFT mix: a prompt/response JSONL, a folder written by
    ``tools/preprocess.py``, or for the demo ``digit_facts:<num>[:<seed>]``, questions "What is a+b?"
    (single digits) answered "a+b = c."."""
    match = _FACTS_SPEC.fullmatch(spec)
    if match and not os.path.exists(spec):
        lines = digit_facts(int(match.group(1)), int(match.group(2) or 0))
        return [tokenizer.encode_example(f"What is {line.split(' = ')[0]}?\n", line, chat=chat) for line in lines]
    return read_sft_samples(spec, tokenizer, seq_length, bad_records)


def instruction_sources(spec: Any) -> list[tuple[str, float]]:
    """``data.instruction`` as (source, weight) pairs. One source is a string; several are a list of
    sources (equal weights), of ``{path, weight}`` objects, or Megatron's ``--data-path`` form
    ``[weight, source, weight, source, ...]``. Weights are relative, as in Megatron's blends."""
    if isinstance(spec, str):
        return [(spec, 1.0)]
    items = list(spec) if isinstance(spec, (list, tuple)) else None
    usage = ("data.instruction: expected a source, a list of sources, a list of {path, weight} objects or "
             "[weight, source, weight, source, ...]")
    if not items:
        raise ValueError(f"{usage}, got {spec!r}")
    if all(isinstance(item, dict) for item in items):
        pairs = []
        for i, item in enumerate(items):
            if not isinstance(item.get("path"), str) or set(item) - {"path", "weight"}:
                raise ValueError(f"data.instruction[{i}]: expected {{path, weight}}, got {item!r}")
            pairs.append((item["path"], item.get("weight", 1.0)))
    elif all(isinstance(item, str) for item in items):
        pairs = [(item, 1.0) for item in items]
    elif len(items) % 2 == 0 and all(isinstance(w, (int, float)) and isinstance(p, str)
                                     for w, p in zip(items[::2], items[1::2])):
        pairs = list(zip(items[1::2], items[::2]))
    else:
        raise ValueError(f"{usage}, got {spec!r}")
    for source, weight in pairs:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"data.instruction: the weight of {source} must be a non-negative number, got {weight!r}")
    if sum(weight for _, weight in pairs) <= 0:
        raise ValueError(f"data.instruction: the weights must not all be 0, got {spec!r}")
    repeated = sorted({source for source, _ in pairs if [p for p, _ in pairs].count(source) > 1})
    if repeated:
        raise ValueError(f"data.instruction: {', '.join(repeated)} listed more than once; give it one weight")
    return [(source, float(weight)) for source, weight in pairs]


@dataclass
class InstructionData:
    """General instruction data for the SFT mix, one sample list per source, with the blend's weights."""

    names: list[str] = field(default_factory=list)
    samples: list[list[Sample]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def read_instruction_data(spec: Any, tokenizer: Tokenizer, seq_length: int, bad_records: str = "fail",
                          chat: bool = False) -> InstructionData:
    """Every source of ``data.instruction`` (:func:`instruction_sources`), read and cut to ``seq_length``;
    a source left with no sample but a positive weight is an error naming it."""
    data = InstructionData()
    if not spec:
        return data
    for source, weight in instruction_sources(spec):
        samples = drop_too_long(read_instruction_samples(source, tokenizer, seq_length, bad_records, chat), seq_length,
                                f"instruction data {source}")
        if not samples and weight > 0:
            raise ValueError(f"data.instruction: {source} has no sample that fits trainer.seq_length={seq_length} "
                             f"but weight {weight}")
        data.names.append(source)
        data.samples.append(samples)
        data.weights.append(weight)
    return data


def mix_with_instruction(judgments: Sequence[Sample], instruction: InstructionData, ratio: float,
                         seed: int) -> tuple[list[Sample], dict[str, int]]:
    """Judgment samples plus general instruction samples so that ``ratio`` of the mix is instruction data
    (paper App. C.1: 1070K of the 1256K RFT samples), and how many came from each source. Sources share
    the instruction part by their weights, apportioned the way Megatron blends datasets (any prefix of the
    blend follows the weights to within one sample). Within a source, samples are drawn without
    replacement while they last, then the pool repeats; the draw is fixed by ``seed``."""
    if ratio <= 0:
        return list(judgments), {}
    require_instruction_data(instruction, ratio)
    wanted = round(len(judgments) * ratio / (1.0 - ratio))
    counts = BlendedDataset(instruction.samples, instruction.weights, size=wanted).counts().tolist()
    mix = list(judgments)
    for k, (samples, count) in enumerate(zip(instruction.samples, counts)):
        rng = np.random.default_rng([seed, 17] if k == 0 else [seed, 17, k])
        picks: list[int] = []
        while len(picks) < count:
            picks.extend(rng.permutation(len(samples))[: count - len(picks)].tolist())
        mix += [samples[i] for i in picks]
    return mix, dict(zip(instruction.names, map(int, counts)))


def require_instruction_data(instruction: InstructionData, ratio: float) -> None:
    """A positive ``rft.instruction_ratio`` with no instruction data is an error (checked before sampling)."""
    if ratio > 0 and not any(instruction.samples):
        raise ValueError(f"rft.instruction_ratio={ratio} needs instruction data: set data.instruction (see "
                         "conf/rft.yaml), or set rft.instruction_ratio=0")


def drop_too_long(samples: Sequence[Sample], seq_length: int, what: str) -> list[Sample]:
    kept = [s for s in samples if len(s[0]) <= seq_length]
    if len(kept) < len(samples):
        log.warning("%s: %d of %d samples are longer than trainer.seq_length=%d and are left out",
                    what, len(samples) - len(kept), len(samples), seq_length)
    return kept


class LengthBucketedProducer(SampleBatchProducer):
    """Supervised micro-batches with little padding.

    Each step draws the same global batch as :class:`SampleBatchProducer`, sorts it by length, cuts it into
    micro-batches padded only to their own longest sample (rounded up to ``pad_multiple``) and deals them
    round-robin to the DP ranks. The loss is a token-weighted mean over the whole global batch, so the
    regrouping changes the padding and nothing else. With ``uniform_length`` (pipeline parallelism, whose
    schedule sends fixed shapes) all micro-batches of a step share the step's longest length.

    With ``pack``, the sorted batch is dealt to the ranks one sample at a time (each rank a like mix of
    lengths), and in each micro-batch consecutive samples share a row while they fit in its longest
    sample's width (block-diagonal causal attention, positions restarting per sample): a mix of short
    instruction pairs and long judgments then needs fewer rows, with the same loss terms. Megatron's
    bool mask for such rows is only honoured by attention that reads an arbitrary mask (the local spec's
    SDPA core), not by Transformer Engine's causal kernels: the stages that offer it check that.
    """

    def __init__(self, samples: Sequence[Sample], global_batch_size: int, micro_batch_size: int, seq_length: int,
                 pad_id: int, seed: int, pad_multiple: int = 8, uniform_length: bool = False,
                 pack: bool = False) -> None:
        super().__init__(samples, global_batch_size, micro_batch_size, seq_length, pad_id, seed)
        too_long = [i for i, s in enumerate(samples) if len(s[0]) > seq_length]
        if too_long:
            i = too_long[0]
            raise ValueError(f"sample {i} has {len(samples[i][0])} tokens > seq_length={seq_length}")
        self.lengths = [len(s[0]) for s in samples]
        self.pad_multiple, self.uniform_length, self.pack = pad_multiple, uniform_length, pack
        self.real_tokens = self.batch_tokens = 0
        self.last_step_waste = 0.0

    def _width(self, group: Sequence[int]) -> int:
        longest = max(self.lengths[i] for i in group)
        return min(self.seq_length, -(-longest // self.pad_multiple) * self.pad_multiple)

    def next_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        indices = global_batch_indices(self.consumed, self.gbs, len(self.samples), self.seed)
        self.consumed += self.gbs
        by_length = sorted(indices, key=lambda i: self.lengths[i])
        if self.pack:  # rank r: sorted samples r, r + dp, ..., cut into micro-batches of mbs samples
            per_rank = [by_length[r::self.dp_size] for r in range(self.dp_size)]
            groups = [share[j:j + self.mbs] for share in per_rank for j in range(0, len(share), self.mbs)]
        else:
            groups = [by_length[j:j + self.mbs] for j in range(0, self.gbs, self.mbs)]
        widths = [self._width(g) for g in groups]
        if self.uniform_length:
            widths = [max(widths)] * len(widths)
        rows = [len(plan_rows([self.lengths[i] for i in g], w)) if self.pack and not self.uniform_length else len(g)
                for g, w in zip(groups, widths)]
        real = sum(self.lengths[i] for i in indices)
        total = sum(w * n for n, w in zip(rows, widths))
        self.real_tokens += real
        self.batch_tokens += total
        self.last_step_waste = 1.0 - real / total
        if self.pack:
            per_rank_groups = len(groups) // self.dp_size
            mine = list(zip(groups, widths))[self.dp_rank * per_rank_groups:(self.dp_rank + 1) * per_rank_groups]
            return [pack_documents([self.samples[i] for i in g], seq_length=w, pad_id=self.pad_id,
                                   num_rows=len(g) if self.uniform_length else None) for g, w in mine]
        mine = list(zip(groups, widths))[self.dp_rank::self.dp_size]
        return [collate_padded([self.samples[i] for i in g], seq_length=w, pad_id=self.pad_id) for g, w in mine]

    @property
    def padding_waste(self) -> float:
        """Fraction of all batch positions so far that were padding."""
        return 1.0 - self.real_tokens / self.batch_tokens if self.batch_tokens else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "real_tokens": self.real_tokens, "batch_tokens": self.batch_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.real_tokens, self.batch_tokens = int(state["real_tokens"]), int(state["batch_tokens"])


# ------------------------------------------------------------------------------------ rejective sampling
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


def rejective_sample(engine, tokenizer, examples: Sequence[Example], first_index: int, shard: int,
                     settings: RFTSettings, sampling: SamplingConfig, rng: random.Random) -> list[dict[str, Any]]:
    """Paper §3.2 on a chunk of examples; returns one record per sampled judgment, kept or not.

    Non-hinted: N judgments per example; a correct one (Eq. 10) is kept unless all N are correct (too easy).
    Hinted: an example none of whose N judgments is correct gets, with probability ``hinted_fraction``, one
    judgment sampled with the hint appended; it is kept if correct. Its record holds the plain prompt, so SFT
    teaches the model to reach the right verdict without the hint.
    """
    n = settings.num_samples
    plain = sample_judgments(engine, tokenizer, examples, n, sampling, rng, settings.variant, settings.chat)
    records, hard = [], []
    for i, example in enumerate(examples):
        group = plain[i * n:(i + 1) * n]
        too_easy = all(j.correct for j in group)
        for k, j in enumerate(group):
            records.append(judgment_record(example, first_index + i, shard, k, j, j.correct and not too_easy, too_easy,
                                           settings.chat))
        if not any(j.correct for j in group) and rng.random() < settings.hinted_fraction:
            hard.append(i)
    if hard:
        # A seed of its own for the hinted pass (its prompts, and so its streams, differ from the plain pass's
        # anyway).
        hinted_sampling = dataclasses.replace(sampling, seed=sampling.seed + 1)
        hinted = sample_judgments(engine, tokenizer, [examples[i] for i in hard], 1, hinted_sampling, rng,
                                  settings.variant, settings.chat, hint=True)
        for i, j in zip(hard, hinted):
            records.append(judgment_record(examples[i], first_index + i, shard, n, j, j.correct, False, settings.chat))
    return sorted(records, key=lambda r: (r["example_index"], r["sample_index"]))


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


def sample_shards(engine, tokenizer, examples: Sequence[Example], settings: RFTSettings, samples_dir: str,
                  seed: int, stop_requested: Callable[[], bool] | None = None) -> list[int]:
    """Rejective sampling over the unfinished shards; returns the shards this process sampled.

    A shard is a fixed chunk of ``shard_size`` examples; shard k belongs to DP replica k mod DP, whose
    model-parallel rank 0 writes it. A shard is finished once its ``.done`` marker exists (written after the
    file is complete), so a rerun never resamples it. Each shard draws from its own seeds, so a resampled
    shard repeats what an uninterrupted run would have drawn (same DP layout). Between rounds of shards a
    stop signal (Slurm's time-limit warning) ends the job with exit code 75 (requeue): finished shards stay.
    """
    from megatron.core import parallel_state

    num_shards = math.ceil(len(examples) / settings.shard_size)
    pending = [k for k in range(num_shards) if not os.path.exists(done_marker(samples_dir, k))]
    distributed = torch.distributed.is_initialized()
    if distributed:  # one view of the folder for every rank
        box = [pending]
        torch.distributed.broadcast_object_list(box, src=0)
        pending = box[0]
    dp_rank = parallel_state.get_data_parallel_rank() if distributed else 0
    dp_size = parallel_state.get_data_parallel_world_size() if distributed else 1
    writer = not distributed or torch.distributed.get_rank(parallel_state.get_model_parallel_group()) == 0
    log.info("rejective sampling: %d of %d shards to sample (%d finished)", len(pending), num_shards,
             num_shards - len(pending))
    mine = []
    for round_ in sorted({k // dp_size for k in pending}):  # every rank runs the same rounds
        k = round_ * dp_size + dp_rank
        if k in pending:
            start, end = k * settings.shard_size, min((k + 1) * settings.shard_size, len(examples))
            records = rejective_sample(engine, tokenizer, examples[start:end], start, k, settings,
                                       settings.sampling_config(seed + 7919 * k), random.Random(f"rft:{seed}:{k}"))
            if writer:
                write_shard(samples_dir, k, records)
            mine.append(k)
            log.info("shard %d: examples %d-%d, %d judgments, %d kept", k, start, end - 1, len(records),
                     sum(r["kept"] for r in records))
        if stop_requested is not None and true_on_any_rank(stop_requested()):
            log.warning("stop requested: finished shards are kept; exiting for requeue")
            barrier()
            exit_for_requeue("rejective sampling: finished shards written")
    barrier()
    return mine


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


def filter_statistics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """What rejective sampling kept and why it dropped the rest (TensorBoard ``rft/*``).

    judgments = kept + rejected (incorrect) + too_easy_judgments (correct, in a too-easy example). A
    judgment never generated (its shown prompt tokenized too long) is rejected, counted as
    ``prompt_too_long`` and left out of the accuracies and the unparseable count.
    """
    generated = [r for r in records if r.get("finish_reason") != PROMPT_TOO_LONG]
    plain = [r for r in records if not r["hinted"]]
    hinted = [r for r in records if r["hinted"]]
    plain_generated = [r for r in generated if not r["hinted"]]
    hinted_generated = [r for r in generated if r["hinted"]]
    return {
        "examples": float(len({r["example_index"] for r in records})),
        "judgments": float(len(records)),
        "kept": float(sum(r["kept"] for r in records)),
        "rejected": float(sum(not r["correct"] for r in records)),
        "too_easy": float(len({r["example_index"] for r in plain if r["too_easy"]})),
        "too_easy_judgments": float(sum(r["too_easy"] for r in records)),
        "hinted": float(len(hinted)),
        "hinted_kept": float(sum(r["kept"] for r in hinted)),
        "examples_kept": float(len({r["example_index"] for r in records if r["kept"]})),
        "unparseable": float(sum(r["scores"] is None for r in generated)),
        "prompt_too_long": float(len(records) - len(generated)),
        "accuracy": (sum(r["correct"] for r in plain_generated) / len(plain_generated) if plain_generated
                     else float("nan")),
        "hinted_accuracy": (sum(r["correct"] for r in hinted_generated) / len(hinted_generated) if hinted_generated
                            else float("nan")),
    }


# ------------------------------------------------------------------------------------------------ stage
def train_rft(cfg: Any) -> Trainer:
    """Sample (skipping finished shards), filter, SFT on the kept judgments + instruction data, checkpoint."""
    run = prepare_run(cfg)
    t = run.trainer
    settings = RFTSettings.from_dict(run.extra.get("rft"))
    data = run.extra.get("data", {}) or {}
    tokenizer_id = tokenizer_name(run)
    tokenizer = load_tokenizer(tokenizer_id)
    samples_dir = settings.samples_dir or os.path.join(t.run_dir, "samples")
    load = starting_checkpoint(t.load, settings.phase)
    mismatch = prompt_template_mismatch(load, settings.variant, settings.chat, ("rft.variant", "rft.chat"))
    if mismatch:  # training on a new template can be meant; sampling in it starts from unseen prompts
        log.warning("%s (unless training on a new template is the point)", mismatch)
    trainer = Trainer(run, metadata={"tokenizer": tokenizer_id, "stage": "rft",
                                     "prompt": prompt_record(settings.variant, settings.chat)})
    fresh = ckpt.latest_checkpoint(trainer.ckpt_root) is None
    if load:
        trainer.load_weights(load)  # the policy that samples, and where SFT starts
    results: dict[str, Any] = {"samples_dir": samples_dir}
    heldout = load_examples(data["heldout"], data.get("bad_records", "fail")) if data.get("heldout") else []
    greedy = SamplingConfig(**{**settings.sampling, "greedy": True})

    def evaluate(step: int, name: str) -> None:
        acc = heldout_accuracy(trainer, tokenizer, heldout, settings.variant, settings.chat, greedy,
                               seed=t.seed, **settings.rollout)
        trainer.logger.scalars(step, {"heldout_accuracy": acc}, prefix="eval/")
        results[f"heldout_accuracy_{name}"] = acc

    instruction = InstructionData()
    if settings.phase != "sample":  # read before sampling: a bad path fails now, not after hours of sampling
        instruction = read_instruction_data(data.get("instruction"), tokenizer, t.seq_length,
                                            data.get("bad_records", "fail"), settings.chat)
        require_instruction_data(instruction, settings.instruction_ratio)

    if heldout and settings.eval_before and fresh:
        evaluate(0, "before")

    # 1. Rejective sampling: N judgments per example (+1 hinted for the hard ones), written shard by shard.
    if settings.phase in ("sample", "all"):
        if not data.get("train"):
            raise ValueError("data.train is not set: give a data spec (a JSONL file of examples, rmb:, reasoning_gym:, "
                             "champ, arithmetic:train:<num>) or a list of them")
        from megatron_grm.rollout.engine import RolloutEngine

        examples = load_examples(data["train"], data.get("bad_records", "fail"))
        # Left out before sharding (the engine would refuse them mid-shard, on every rerun).
        limit, max_new = run.model.max_position_embeddings, settings.sampling_config(t.seed).max_new_tokens
        examples, too_long = split_by_prompt_room(examples, tokenizer, settings.variant, settings.chat, max_new,
                                                  limit, hint=settings.hinted_fraction > 0)
        report_too_long("RFT", too_long, len(examples) + len(too_long), max_new, limit,
                        "model.max_position_embeddings")
        results["too_long_examples"] = len(too_long)
        if not examples:
            raise ValueError(f"no example of data.train leaves room for {max_new} judgment tokens within "
                             f"model.max_position_embeddings={limit}")
        check_manifest(samples_dir, {
            "data": data["train"], "num_examples": len(examples), "shard_size": settings.shard_size,
            "num_shards": math.ceil(len(examples) / settings.shard_size), "num_samples": settings.num_samples,
            "hinted_fraction": settings.hinted_fraction, "variant": settings.variant, "chat": settings.chat,
            "sampling": dataclasses.asdict(settings.sampling_config(t.seed)), "policy": load, "seed": t.seed,
        })
        start = time.perf_counter()
        engine = RolloutEngine(trainer.unwrapped, tokenizer, **settings.rollout)
        results["sampled_shards"] = sample_shards(engine, tokenizer, examples, settings, samples_dir, t.seed,
                                                   stop_requested=lambda: trainer.stop.requested)
        results["sampling_seconds"] = time.perf_counter() - start

    # 2. Filter statistics, read back from the shards (so a train-only job reports the same numbers).
    records = read_shards(samples_dir)
    stats = filter_statistics(records)
    trainer.logger.scalars(0, stats, prefix="rft/")
    results["filter"] = stats
    log.info("rejective sampling: %d examples, %d judgments (accuracy %.3f): kept %d, rejected %d, too easy %d "
             "examples (%d judgments), hinted %d (kept %d)", stats["examples"], stats["judgments"],
             stats["accuracy"], stats["kept"], stats["rejected"], stats["too_easy"], stats["too_easy_judgments"],
             stats["hinted"], stats["hinted_kept"])
    if settings.phase == "sample":
        trainer.logger.close()
        _write_results(t.run_dir, results)
        return trainer

    # 3. SFT on the kept judgments mixed with general instruction data; loss on the response tokens only.
    judgments = [kept_judgment_ids(tokenizer, r, f"{shard_file(samples_dir, r['shard'])}: example {r['example_id']!r} "
                                                 f"sample {r['sample_index']}") for r in records if r["kept"]]
    judgments = drop_too_long(judgments, t.seq_length, "kept judgments")
    samples, per_source = mix_with_instruction(judgments, instruction, settings.instruction_ratio, t.seed)
    if not samples:  # instruction data comes in proportion to the kept judgments: none without them
        raise RuntimeError(f"rejective sampling kept no judgment of {len(records)}: nothing to train on (instruction "
                           f"data is mixed in at rft.instruction_ratio={settings.instruction_ratio} of the kept "
                           "judgments). Is trainer.load a model that writes judgments? See stages/bootstrap.py")
    log.info("SFT mix: %d kept judgments + %d instruction samples %s", len(judgments), len(samples) - len(judgments),
             per_source)
    results.update(sft_judgments=len(judgments), sft_instruction=len(samples) - len(judgments),
                   sft_instruction_sources=per_source)
    producer = LengthBucketedProducer(samples, t.global_batch_size, t.micro_batch_size, t.seq_length,
                                      tokenizer.pad_id, t.seed, pad_multiple_for(run, settings.pad_multiple),
                                      uniform_length=run.parallel.pipeline_parallel > 1)
    trainer.resume(producer)  # continues exactly when this run already has a checkpoint

    def on_step(tr: Trainer, result) -> dict[str, float]:
        if heldout and tr.state.step == t.max_steps:
            evaluate(tr.state.step, "after")
        return {"padding_waste": producer.last_step_waste}

    start = time.perf_counter()
    trainer.fit(producer, SupervisedObjective(t.loss_tokens_only), on_step=on_step)
    results["train_seconds"] = time.perf_counter() - start
    if heldout and "heldout_accuracy_after" not in results and trainer.state.step == t.max_steps:
        # Resumed at the last step (a job that ended between the final checkpoint and this file): no step ran.
        evaluate(trainer.state.step, "after")
    fixed = 1.0 - producer.real_tokens / max(1, producer.consumed * t.seq_length)
    results["padding_waste"] = producer.padding_waste
    log.info("padding waste %.1f%% of batch positions (%.1f%% if every row were padded to trainer.seq_length=%d)",
             100 * producer.padding_waste, 100 * fixed, t.seq_length)
    _write_results(t.run_dir, results)
    return trainer


def starting_checkpoint(load: str | None, phase: str) -> str | None:
    """``trainer.load`` as a checkpoint folder: a run's ``checkpoints`` folder means its ``latest``.

    Sampling needs it: RFT samples with the model it starts from (paper §3.2: a pretrained GRM), and a
    randomly initialised model writes no judgment worth keeping.
    """
    if load and not os.path.isdir(load):
        raise FileNotFoundError(f"trainer.load={load} does not exist (the tiny demo starts from stages/bootstrap.py's "
                                "runs/bootstrap/checkpoints: run that first)")
    if not load and phase != "train":
        raise ValueError("trainer.load is not set: rejective sampling needs the policy to sample from (a converted "
                         "base model, or for the tiny demo the checkpoints of stages/bootstrap.py)")
    return ckpt.checkpoint_folder(load) if load else None


def pad_multiple_for(run, pad_multiple: int) -> int:
    """Sequence lengths must split evenly under sequence parallelism (TP) and context parallelism (2·CP);
    under FP8 with sequence parallelism each rank's slice must itself hold a multiple of 8 rows (TE runs
    the GEMM on the local slice before its all-gather)."""
    p = run.parallel
    multiple = pad_multiple
    if p.sequence_parallel:
        multiple = math.lcm(multiple, p.tensor_parallel)
        if run.precision.fp8 is not None:
            multiple = math.lcm(multiple, 8 * p.tensor_parallel)
    if p.context_parallel > 1:
        multiple = math.lcm(multiple, 2 * p.context_parallel)
    return multiple


def _write_results(run_dir: str, results: dict[str, Any]) -> None:
    """``<run_dir>/rft_results.json``: filter statistics, SFT mix, held-out accuracy, timings (rank 0)."""
    if is_rank0():  # whole or not at all: a rank killed mid-write must not leave half a file
        ckpt.write_atomically(os.path.join(run_dir, "rft_results.json"), json.dumps(results, indent=2, sort_keys=True))


@hydra.main(config_path=CONF_DIR, config_name="rft", version_base="1.3")
def main(cfg) -> None:
    run_stage(train_rft, cfg)


if __name__ == "__main__":
    main()
