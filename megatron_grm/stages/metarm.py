"""MetaRM training (paper §4.2): a scalar head learns which sampled judgments are correct (Eq. 10).

    torchrun --nproc-per-node 2 -m megatron_grm.stages.metarm +experiment=metarm_tiny \\
        trainer.load=runs/rft/checkpoints 'data.samples=[runs/rft/samples]' data.train=arithmetic:train:256

judgments (RFT sample files + fresh samples of the trained GRM) → Eq. 10 labels → MetaRM inputs
(``metarm_prompt``: GRM prompt + judgment) → held-out split by example → binary cross-entropy on the
head over the backbone → held-out BCE, accuracy and ROC-AUC (``<run_dir>/metarm_eval.json``).
The labelled judgments are written once to ``<run_dir>/metarm_judgments.jsonl``, so a resumed run trains
on exactly the same data (fresh samples come from the GRM before MetaRM training changes the backbone).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import hydra
import torch
import torch.nn.functional as F

from megatron_grm.data.examples import Example, ExampleError
from megatron_grm.data.readers.common import check_example_id, json_object_lines, require_types
from megatron_grm.data.sources import load_examples
from megatron_grm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_grm.models.metarm import (
    attach_metarm_head,
    collate_metarm,
    load_model_weights,
    metarm_forward,
    metarm_input_ids,
    metarm_logits,
)
from megatron_grm.models.provider import build_model
from megatron_grm.parallel.distributed import barrier, data_parallel_rank_and_size, is_rank0
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.spct import is_correct, roc_auc
from megatron_grm.stages.common import CONF_DIR, prepare_run, prompt_template_mismatch, run_stage, tokenizer_name
from megatron_grm.train import checkpoint as ckpt
from megatron_grm.train.loop import Batch, Trainer
from megatron_grm.train.losses import LossOutput, binary_cross_entropy
from megatron_grm.train.producers import SampleBatchProducer

log = logging.getLogger(__name__)

JUDGMENTS_FILE = "metarm_judgments.jsonl"
EVAL_FILE = "metarm_eval.json"


class MetaRMObjective:
    """The head's logit at each sequence's last token, trained with :func:`binary_cross_entropy`."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return metarm_forward(model, batch["tokens"], batch["position_ids"], batch["attention_mask"],
                              batch["last_index"])

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        return binary_cross_entropy(output, batch["correct"])


# ------------------------------------------------------------------------------------------ settings
@dataclass
class FreshSampling:
    """Fresh judgments of the trained GRM on ``data.train`` (paper §4.2)."""

    n: int = 4
    temperature: float = 0.5  # the inference-time temperature (voting, paper §4.1)
    max_new_tokens: int = 1024
    variant: str = "default"
    chat: bool = True


@dataclass
class MetaRMSettings:
    heldout_fraction: float = 0.05  # share of the examples (with all their judgments) held out
    eval_interval: int = 0  # held-out metrics every this many steps (0: only before and after training)
    include_hinted: bool = False  # hinted RFT samples are not what the GRM writes at inference
    random_backbone: bool = False  # allow trainer.load=null: a randomly initialised backbone (tests only)
    fresh: FreshSampling = field(default_factory=FreshSampling)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MetaRMSettings:
        values = dict(values)
        fresh = dict(values.pop("fresh", None) or {})
        for where, known, given in (("metarm", cls.__dataclass_fields__, values),
                                    ("metarm.fresh", FreshSampling.__dataclass_fields__, fresh)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ValueError(f"unknown {where} field(s) {unknown}; known: {sorted(known)}")
        settings = cls(**values, fresh=FreshSampling(**fresh))
        if not 0 <= settings.heldout_fraction < 1:
            raise ValueError(f"metarm.heldout_fraction={settings.heldout_fraction}: must be in [0, 1)")
        return settings


# ------------------------------------------------------------------------------------------ the data
@dataclass
class LabelledJudgment:
    """One judgment with its Eq. 10 label; ``prompt`` is the GRM prompt as shown (without any hint)."""

    example_id: str
    prompt: str
    text: str
    correct: bool
    origin: str  # "rft" (a sample file) | "fresh" (sampled here from the GRM)


def sample_files(paths: Sequence[str] | str | None) -> list[str]:
    """Files named by ``data.samples``: files, globs, or folders (their ``*.jsonl``), sorted, deduplicated.

    In a folder of RFT shards (``shard_XXXXX.jsonl`` + ``.done`` once complete) an unfinished shard is
    left out, with a warning: its last line may be cut.
    """
    if not paths:
        return []
    found: list[str] = []
    for item in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(item):
            matches = sorted(glob.glob(os.path.join(item, "*.jsonl")))
            if glob.glob(os.path.join(item, "*.done")):
                unfinished = [m for m in matches if not os.path.exists(m[: -len(".jsonl")] + ".done")]
                if unfinished:
                    log.warning("%s: leaving out %d unfinished shard(s): %s", item, len(unfinished), unfinished)
                matches = [m for m in matches if m not in unfinished]
        else:
            matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"data.samples: {item!r} names no sample file")
        found.extend(m for m in matches if m not in found)
    return found


def read_rft_samples(path: str, include_hinted: bool = False) -> list[LabelledJudgment]:
    """Judgments from an RFT sample file (one JSON object per line; extra fields are ignored).

    Needs ``prompt`` and ``text``; the label is ``correct`` or, without it, Eq. 10 on ``scores`` and
    ``label``. Hinted samples are left out (and counted) unless asked for: the MetaRM rates the judgments the
    GRM writes unhinted, at inference. So is a judgment that was never generated (its shown prompt left no
    room for it, ``finish_reason`` ``prompt_too_long``): it says nothing about the GRM. Every record is
    checked before any is left out, so a bad one is an error naming the file, line and field, never lost.
    """
    from megatron_grm.rollout.judgments import PROMPT_TOO_LONG

    out: list[LabelledJudgment] = []
    without_id = never_written = hinted = 0
    for where, record in json_object_lines(path):
        correct, example_id = _check_rft_sample(record, where)
        if record.get("hinted", False) and not include_hinted:
            hinted += 1
            continue
        if record.get("finish_reason") == PROMPT_TOO_LONG:
            never_written += 1
            continue
        if example_id is None:
            without_id += 1
        out.append(LabelledJudgment(where if example_id is None else example_id, record["prompt"], record["text"],
                                    correct, "rft"))
    if hinted:
        log.info("%s: %d hinted judgment(s) left out (metarm.include_hinted=false)", path, hinted)
    if never_written:
        log.info("%s: %d judgment(s) never generated (prompt too long) left out", path, never_written)
    if without_id:
        log.warning("%s: %d judgment(s) name no example (example_id, id or example): each counts as an example of "
                    "its own in the held-out split, so judgments of one example may land on both sides", path,
                    without_id)
    return out


def _check_rft_sample(record: dict[str, Any], where: str) -> tuple[bool, str | None]:
    """(Eq. 10 label, example id or None) of one sample record, with the field types the RFT sampler writes
    (docs/rft.md): a string ``"false"`` must not read as true, nor ``["3", "10"]`` compare as strings."""
    require_types(record, where, {"prompt": str, "text": str})
    for name in ("hinted", "correct"):
        if name in record and not isinstance(record[name], bool):
            raise ValueError(f"{where}: field {name!r} must be a bool, got {record[name]!r}")
    if "finish_reason" in record and not isinstance(record["finish_reason"], str):
        raise ValueError(f"{where}: field 'finish_reason' must be a str, got {record['finish_reason']!r}")
    scores = record.get("scores")
    if scores is not None and not (isinstance(scores, list) and scores and all(type(x) is int for x in scores)):
        raise ValueError(f"{where}: field 'scores' must be a non-empty list of integers or null, got {scores!r}")
    if "label" in record and type(record["label"]) is not int:
        raise ValueError(f"{where}: field 'label' must be an int, got {record['label']!r}")
    if "correct" in record:
        correct = record["correct"]
    elif "scores" in record and "label" in record:
        try:
            correct = is_correct(scores, label=record["label"])
        except ValueError as err:  # a label out of range for the scores
            raise ValueError(f"{where}: field 'label': {err}") from None
    else:
        raise ValueError(f"{where}: needs 'correct' (or 'scores' and 'label') for the Eq. 10 label")
    name = next((n for n in ("example_id", "id", "example") if n in record), None)
    if name is None:
        return correct, None
    try:
        return correct, check_example_id(record[name], name)
    except ExampleError as err:
        raise ValueError(f"{where}: {err}") from None


def sample_fresh_judgments(model: torch.nn.Module, tokenizer: Tokenizer, examples: Sequence[Example], n: int,
                           sampling: SamplingConfig, variant: str, chat: bool, seed: int) -> list[LabelledJudgment]:
    """``n`` judgments per example from the GRM (paper §4.2: MetaRM data also comes from the trained GRM).

    Data-parallel replicas sample disjoint shards of the examples; every rank returns all judgments.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    from megatron_grm.rollout import RolloutEngine
    from megatron_grm.rollout.judgments import PROMPT_TOO_LONG, report_too_long, sample_judgments, split_by_prompt_room

    limit = unwrap_model(model).max_sequence_length
    fit, too_long = split_by_prompt_room(examples, tokenizer, variant, chat, sampling.max_new_tokens, limit)
    report_too_long("MetaRM fresh judgments", too_long, len(examples), sampling.max_new_tokens, limit,
                    "model.max_position_embeddings")
    dp_rank, dp_size = data_parallel_rank_and_size()
    shard = fit[dp_rank::dp_size]
    engine = RolloutEngine(model, tokenizer)
    rng = random.Random(f"metarm-fresh:{seed}:{dp_rank}")
    judged = sample_judgments(engine, tokenizer, shard, n, sampling, rng, variant=variant, chat=chat)
    # A judgment never written (its shown order tokenized too long) says nothing about the GRM: not data.
    mine = [LabelledJudgment(shard[j.example_index].id, j.prompt, j.text, j.correct, "fresh") for j in judged
            if j.finish_reason != PROMPT_TOO_LONG]
    if dp_size == 1:
        return mine
    parts: list[Any] = [None] * dp_size
    torch.distributed.all_gather_object(parts, mine, group=parallel_state.get_data_parallel_group())
    return [j for part in parts for j in part]


def read_judgments_file(path: str) -> list[LabelledJudgment]:
    """The labelled judgments a run wrote to ``metarm_judgments.jsonl``; a line that is not one (a broken
    write, an edit by hand) is an error naming the file, the line and the field, never a judgment lost."""
    types = {"example_id": str, "prompt": str, "text": str, "correct": bool, "origin": str}
    out = []
    for where, record in json_object_lines(path):
        require_types(record, where, types)
        extra = sorted(set(record) - set(types))
        if extra:
            raise ValueError(f"{where}: unknown field(s) {extra}")
        out.append(LabelledJudgment(**record))
    return out


def is_heldout(example_id: str, fraction: float) -> bool:
    """Held-out by example (all judgments of an example on one side), from a hash of its id."""
    return zlib.crc32(example_id.encode()) % 10_000 < fraction * 10_000


def collect_judgments(run, model: torch.nn.Module, tokenizer: Tokenizer) -> list[LabelledJudgment]:
    """The run's labelled judgments: read from ``<run_dir>/metarm_judgments.jsonl`` once written, else
    gathered from the RFT sample files and fresh GRM samples, then written there (rank 0)."""
    data, mc = run.extra.get("data", {}), MetaRMSettings.from_dict(run.extra.get("metarm", {}))
    cache = os.path.join(run.trainer.run_dir, JUDGMENTS_FILE)
    cached = os.path.exists(cache)
    barrier()  # every rank has looked before rank 0 may write it: all take the same branch
    if cached:
        judgments = read_judgments_file(cache)
        log.info("%s: %d labelled judgments (written by an earlier attempt of this run)", cache, len(judgments))
        return judgments
    if ckpt.latest_checkpoint(os.path.join(run.trainer.run_dir, "checkpoints")) is not None:
        raise FileNotFoundError(f"{cache} is missing but the run has checkpoints: the MetaRM data cannot be "
                                "resampled from the original GRM; start a new run_dir")
    judgments: list[LabelledJudgment] = []
    for path in sample_files(data.get("samples")):
        read = read_rft_samples(path, include_hinted=mc.include_hinted)
        log.info("%s: %d judgments", path, len(read))
        judgments.extend(read)
    if data.get("train"):
        fresh = mc.fresh
        sampling = SamplingConfig(temperature=fresh.temperature, max_new_tokens=fresh.max_new_tokens,
                                  seed=run.trainer.seed)
        examples = load_examples(data["train"], on_error=data.get("bad_records", "fail"), seed=run.trainer.seed)
        judgments.extend(sample_fresh_judgments(model, tokenizer, examples, fresh.n, sampling, fresh.variant,
                                                fresh.chat, run.trainer.seed))
    if not judgments:
        raise ValueError("no judgments: set data.samples (RFT sample files) and/or data.train (examples to sample)")
    if is_rank0():  # on disk before a checkpoint can depend on it: a resumed run reads it back
        ckpt.write_atomically(cache, "".join(json.dumps(asdict(j), ensure_ascii=False) + "\n" for j in judgments))
    barrier()
    return judgments


def to_samples(judgments: Sequence[LabelledJudgment], tokenizer: Tokenizer, seq_length: int):
    """(token ids, [label]) per judgment for :func:`collate_metarm`; counts inputs cut to seq_length."""
    samples, cut = [], 0
    for j in judgments:
        ids, truncated = metarm_input_ids(tokenizer, j.prompt, j.text, seq_length)
        cut += truncated
        samples.append((ids, [1.0 if j.correct else 0.0]))
    if cut:
        log.warning("%d of %d MetaRM inputs exceed trainer.seq_length=%d: kept their last tokens",
                    cut, len(samples), seq_length)
    return samples


# ------------------------------------------------------------------------------------------ held-out metrics
def heldout_metrics(model: torch.nn.Module, samples: Sequence[tuple[list[int], list[float]]],
                    micro_batch_size: int, pad_id: int) -> dict[str, float | None]:
    """BCE, accuracy (threshold 0.5) and ROC-AUC of the MetaRM on held-out judgments."""
    if not samples:
        return {}
    logits = metarm_logits(model, [ids for ids, _ in samples], micro_batch_size, pad_id)
    labels = [int(label[0]) for _, label in samples]
    bce = F.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(labels, dtype=torch.float32))
    both = 0 < sum(labels) < len(labels)
    return {
        "bce": float(bce),
        "accuracy": sum((s > 0) == (y == 1) for s, y in zip(logits, labels)) / len(labels),
        "auc": roc_auc(logits, labels) if both else None,  # undefined with one class only
        "positive_rate": sum(labels) / len(labels),
        "count": len(labels),
    }


# ------------------------------------------------------------------------------------------ the stage
def train_metarm(cfg: Any) -> Trainer:
    """Gather labelled judgments, attach the head to the GRM backbone, fit with BCE, report held-out metrics."""
    run = prepare_run(cfg)
    t, mc = run.trainer, MetaRMSettings.from_dict(run.extra.get("metarm", {}))
    tokenizer_id = tokenizer_name(run)
    tokenizer = load_tokenizer(tokenizer_id)
    if not t.load and not mc.random_backbone:
        raise ValueError("trainer.load is not set: the MetaRM's backbone is the trained GRM (an RFT/GRPO checkpoint "
                         "folder); metarm.random_backbone=true starts from random weights (tests only)")
    if (run.extra.get("data") or {}).get("train"):  # fresh judgments: what the GRM writes in its own template
        mismatch = prompt_template_mismatch(t.load, mc.fresh.variant, mc.fresh.chat,
                                            ("metarm.fresh.variant", "metarm.fresh.chat"))
        if mismatch:  # the MetaRM would learn to rate judgments the GRM never writes at inference
            raise ValueError(mismatch)
    model = build_model(run.model, run.parallel, run.precision, t.recompute, wgrad_fusion=True)  # for the Trainer
    resuming = ckpt.latest_checkpoint(os.path.join(t.run_dir, "checkpoints")) is not None
    if t.load and not resuming:  # the GRM's weights (its checkpoint has no head: load before attaching)
        log.info("loaded the GRM backbone from %s", load_model_weights(model, t.load, run.model))

    judgments = collect_judgments(run, model, tokenizer)
    train = [j for j in judgments if not is_heldout(j.example_id, mc.heldout_fraction)]
    heldout = [j for j in judgments if is_heldout(j.example_id, mc.heldout_fraction)]
    if not train:
        raise ValueError(f"all {len(judgments)} judgments fell into the held-out split (metarm.heldout_fraction)")
    log.info("MetaRM data: %d train (%.1f%% correct), %d held-out judgments", len(train),
             100 * sum(j.correct for j in train) / len(train), len(heldout))
    train_samples = to_samples(train, tokenizer, t.seq_length)
    heldout_samples = to_samples(heldout, tokenizer, t.seq_length)

    attach_metarm_head(model, seed=t.seed)
    metadata = {"tokenizer": tokenizer_id, "stage": "metarm",
                "metarm": {"input": "metarm_prompt(GRM prompt, judgment), last token after the final norm",
                           "output": "logit of P(judgment correct) (paper Eq. 10)"}}
    trainer = Trainer(run, metadata=metadata, model=model)
    producer = SampleBatchProducer(train_samples, t.global_batch_size, t.micro_batch_size, t.seq_length,
                                   pad_id=tokenizer.pad_id, seed=t.seed, collate=collate_metarm)
    trainer.resume(producer)

    def measure() -> dict[str, float | None]:
        return heldout_metrics(trainer.model, heldout_samples, t.micro_batch_size, tokenizer.pad_id)

    report = report_until(_read_report(t.run_dir), trainer.state.step)
    if trainer.state.step == 0:
        report = {"initial": measure(), "history": []}
        _write_report(t.run_dir, report)
    interval = mc.eval_interval

    def on_step(tr: Trainer, result) -> dict[str, float]:
        if not interval or tr.state.step % interval or tr.state.step >= t.max_steps:
            return {}
        metrics = measure()
        report["history"].append({"step": tr.state.step, **metrics})
        _write_report(t.run_dir, report)
        return {f"heldout_{k}": v for k, v in metrics.items() if isinstance(v, float)}

    trainer.fit(producer, MetaRMObjective(), on_step=on_step)
    final = measure()
    report["final"] = {"step": trainer.state.step, **final}
    report["data"] = {"train": len(train), "heldout": len(heldout),
                      "origins": {o: sum(j.origin == o for j in judgments) for o in ("rft", "fresh")}}
    _write_report(t.run_dir, report)
    if is_rank0():
        initial = report.get("initial", {})
        log.info("held-out MetaRM: BCE %s -> %.4f, accuracy %.3f, AUC %s (%d judgments)",
                 _fmt(initial.get("bce")), final.get("bce", math.nan), final.get("accuracy", math.nan),
                 _fmt(final.get("auc")), final.get("count", 0))
    return trainer


def report_until(report: dict[str, Any], step: int) -> dict[str, Any]:
    """The held-out report as of checkpoint ``step``: the steps after it are trained again by a resumed run,
    so an earlier attempt's evaluations of them (and its final entry) would otherwise appear twice."""
    kept = {k: v for k, v in report.items() if not (k == "final" and v.get("step", 0) > step)}
    kept["history"] = [entry for entry in report.get("history", []) if entry["step"] <= step]
    return kept


def _read_report(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, EVAL_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"history": []}


def _write_report(run_dir: str, report: dict[str, Any]) -> None:
    if is_rank0():
        ckpt.write_atomically(os.path.join(run_dir, EVAL_FILE), json.dumps(report, indent=2))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@hydra.main(config_path=CONF_DIR, config_name="metarm", version_base="1.3")
def main(cfg) -> None:
    run_stage(train_metarm, cfg)


if __name__ == "__main__":
    main()
