"""General instruction data mixed into the judgments that the bootstrap and RFT stages fine-tune on.

Paper App. C.1 trains RFT on 1256K samples of which 1070K are general instruction data, so that the GRM
keeps its general abilities. ``data.instruction`` names the sources (JSONL, preprocessed folders, or the
demo's ``digit_facts``) as a Megatron-style blend; ``rft.instruction_ratio`` (``bootstrap.instruction_ratio``)
sets their share of the mix.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_grm.data.arithmetic import digit_facts
from megatron_grm.data.blend import BlendedDataset
from megatron_grm.data.tokenizer import Tokenizer
from megatron_grm.stages.sft import read_sft_samples
from megatron_grm.train.producers import Sample

log = logging.getLogger(__name__)

_FACTS_SPEC = re.compile(r"digit_facts:(\d+)(?::(\d+))?")


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


def mix_with_instruction(judgments: Sequence[Sample], instruction: InstructionData, ratio: float, seed: int,
                         stage: str = "rft") -> tuple[list[Sample], dict[str, int]]:
    """Judgment samples plus general instruction samples so that ``ratio`` of the mix is instruction data
    (paper App. C.1: 1070K of the 1256K RFT samples), and how many came from each source. Sources share
    the instruction part by their weights, apportioned the way Megatron blends datasets (any prefix of the
    blend follows the weights to within one sample). Within a source, samples are drawn without
    replacement while they last, then the pool repeats; the draw is fixed by ``seed``. ``stage`` names
    the config section that set ``ratio``, for the error when there is no instruction data."""
    if ratio <= 0:
        return list(judgments), {}
    require_instruction_data(instruction, ratio, stage)
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


def require_instruction_data(instruction: InstructionData, ratio: float, stage: str = "rft") -> None:
    """A positive ``<stage>.instruction_ratio`` with no instruction data is an error (RFT checks it before
    sampling)."""
    if ratio > 0 and not any(instruction.samples):
        raise ValueError(f"{stage}.instruction_ratio={ratio} needs instruction data: set data.instruction (see "
                         f"conf/{stage}.yaml), or set {stage}.instruction_ratio=0")


def drop_too_long(samples: Sequence[Sample], seq_length: int, what: str) -> list[Sample]:
    kept = [s for s in samples if len(s[0]) <= seq_length]
    if len(kept) < len(samples):
        log.warning("%s: %d of %d samples are longer than trainer.seq_length=%d and are left out",
                    what, len(samples) - len(kept), len(samples), seq_length)
    return kept
