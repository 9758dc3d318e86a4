"""Supervised fine-tuning on prompt/response JSONL, loss on response tokens only (RFT's training half).

    torchrun --nproc-per-node 2 -m megatron_grm.stages.sft model=tiny parallel=tp2 data.train=sft.jsonl
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import hydra
import torch

from megatron_grm.data.preprocess import MANIFEST, PreprocessedDataset, encode_record
from megatron_grm.data.readers.common import RecordError, decode_utf8, load_record
from megatron_grm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_grm.stages.common import CONF_DIR, prepare_run, run_stage, tokenizer_name
from megatron_grm.train.loop import Batch, Trainer, token_nll_forward
from megatron_grm.train.losses import LossOutput, masked_token_nll
from megatron_grm.train.producers import Sample, SampleBatchProducer

log = logging.getLogger(__name__)


class SupervisedObjective:
    """Masked next-token cross-entropy: the model learns to write the response given the prompt.

    ``loss_tokens_only`` (``trainer.loss_tokens_only``): project only the response tokens onto the vocabulary.
    """

    def __init__(self, loss_tokens_only: bool = True) -> None:
        self.loss_tokens_only = loss_tokens_only

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return token_nll_forward(model, batch, self.loss_tokens_only)

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        return masked_token_nll(-output, batch["loss_mask"])


def read_sft_jsonl(path: str, tokenizer: Tokenizer, seq_length: int, bad_records: str = "fail") -> list[Sample]:
    """Tokenize a JSONL of ``{"prompt", "response"}`` or ``{"messages"}`` records, by the rules a
    ``tools/preprocess.py`` folder is built with (``data.preprocess.encode_record``: unknown fields,
    empty responses and malformed turns are bad records), plus an optional per-record ``"chat": false``
    for a prompt given as the model's raw input. A bad line fails, naming file, line and field, or with
    ``bad_records=skip`` is skipped and counted. A document must fit in ``seq_length`` tokens: the
    batcher shifts the labels inside the row."""
    if bad_records not in ("fail", "skip"):
        raise ValueError(f"data.bad_records={bad_records!r}; choose 'fail' or 'skip'")
    samples: list[Sample] = []
    skipped: list[str] = []
    with open(path, "rb") as f:  # bytes: a bad byte is one bad record, not a crash naming no line
        for line_no, raw in enumerate(f, start=1):
            try:
                try:  # the example readers' decoding: a leading BOM dropped, bad bytes named
                    line = decode_utf8(raw, path, line=line_no, start_of_file=line_no == 1)
                except RecordError as err:
                    raise ValueError(err.reason) from None
                if not line.strip():
                    continue
                try:
                    record = load_record(line)  # a repeated key is a ValueError naming it
                except json.JSONDecodeError as err:
                    raise ValueError(f"invalid JSON ({err.msg})") from None
                ids, mask = encode_record(record, tokenizer)  # a record's "chat": false is honoured there
                if len(ids) > seq_length:
                    raise ValueError(f"{len(ids)} tokens exceed trainer.seq_length={seq_length}")
            except ValueError as err:  # RecordError (field: why) included
                message = f"{path}:{line_no}: {err}"
                if bad_records == "fail":
                    raise ValueError(message) from None
                skipped.append(message)
                continue
            samples.append((ids.tolist(), mask.tolist()))
    if skipped:
        log.warning("skipped %d bad record(s) in %s:\n  %s", len(skipped), path, "\n  ".join(skipped[:20]))
    log.info("%s: %d samples, %d skipped", path, len(samples), len(skipped))
    return samples


def read_sft_samples(spec: str, tokenizer: Tokenizer, seq_length: int, bad_records: str = "fail"
                     ) -> Sequence[Sample]:
    """SFT samples from a prompt/response JSONL (tokenized here) or from a folder written by
    ``tools/preprocess.py`` (Megatron indexed datasets, memory-mapped: large mixes are tokenized once)."""
    if os.path.isdir(spec):
        return open_preprocessed(spec, tokenizer, seq_length)
    return read_sft_jsonl(spec, tokenizer, seq_length, bad_records)


def open_preprocessed(folder: str, tokenizer: Tokenizer, seq_length: int) -> PreprocessedDataset:
    """A preprocessed folder, refused unless its tokenizer is this run's and its documents fit."""
    dataset = PreprocessedDataset(folder)
    manifest = os.path.join(folder, MANIFEST)
    theirs, ours = dataset.manifest.get("tokenizer", {}), tokenizer.describe()
    if theirs.get("sha256") != ours["sha256"]:
        raise ValueError(f"{manifest}: field 'tokenizer' is {theirs.get('path')!r} (sha256 "
                         f"{str(theirs.get('sha256'))[:12]}), not this run's tokenizer {ours['path']!r} (sha256 "
                         f"{ours['sha256'][:12]}); preprocess the data again with the run's tokenizer")
    lengths = dataset.sequence_lengths
    too_long = int((lengths > seq_length).sum())
    if too_long:
        raise ValueError(f"{folder}: {too_long} of {len(dataset)} documents exceed trainer.seq_length="
                         f"{seq_length} tokens (longest {int(lengths.max())}); preprocess with "
                         f"--max-tokens {seq_length} or raise trainer.seq_length")
    log.info("%s: %d preprocessed samples (%d tokens)", folder, len(dataset), int(lengths.sum()))
    return dataset


def train_sft(cfg: Any, samples: Sequence[Sample] | None = None) -> Trainer:
    """Build the trainer, resume if the run has a checkpoint, fit, and return the trainer."""
    run = prepare_run(cfg)
    tokenizer_id = tokenizer_name(run)
    tokenizer = load_tokenizer(tokenizer_id)
    data = run.extra.get("data", {})
    if samples is None:
        if not data.get("train"):
            raise ValueError("data.train is not set: give a JSONL file of prompt/response records or a folder "
                             "written by tools/preprocess.py")
        samples = read_sft_samples(data["train"], tokenizer, run.trainer.seq_length,
                                   data.get("bad_records", "fail"))
    trainer = Trainer(run, metadata={"tokenizer": tokenizer_id, "stage": "sft"})
    t = run.trainer
    producer = SampleBatchProducer(samples, t.global_batch_size, t.micro_batch_size, t.seq_length,
                                   pad_id=tokenizer.pad_id, seed=t.seed)
    if not trainer.resume(producer) and t.load:
        trainer.load_weights(t.load)
    trainer.fit(producer, SupervisedObjective(t.loss_tokens_only))
    return trainer


@hydra.main(config_path=CONF_DIR, config_name="sft", version_base="1.3")
def main(cfg) -> None:
    run_stage(train_sft, cfg)


if __name__ == "__main__":
    main()
