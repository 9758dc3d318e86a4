"""The demo's cold start: SFT the tiny model on a teacher's SPCT judgments of the arithmetic task.

Rejective fine-tuning (paper §3.2) needs a model that already writes judgments in the format: the paper
samples its RFT trajectories with DeepSeek-V2.5 and mixes in general instruction data. The CPU demo's tiny
model writes nothing parseable at random init, so rejective sampling would keep nothing. This stage teaches
it the format and some signal: judgments from a teacher that is right with probability
``bootstrap.teacher_accuracy`` (notes/cpu-miniature.md: 0.7), mixed with single-digit facts "What is a+b?" →
"a+b = c." as the general instruction data (``bootstrap.instruction_ratio`` of the mix), the one computation
the teacher's critique needs (docs/rft.md). Its checkpoint is ``trainer.load`` for ``stages/rft.py``.

    torchrun --nproc-per-node 2 -m megatron_grm.stages.bootstrap trainer.run_dir=runs/bootstrap
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hydra

from megatron_grm.data.arithmetic import teacher_judgment
from megatron_grm.data.examples import Example
from megatron_grm.data.sources import load_examples
from megatron_grm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_grm.parallel.device import use_te_spec
from megatron_grm.parallel.distributed import is_rank0
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.spct import build_prompt
from megatron_grm.stages.common import CONF_DIR, prepare_run, prompt_record, run_stage, tokenizer_name
from megatron_grm.stages.heldout import heldout_accuracy
from megatron_grm.stages.instruction_data import drop_too_long, mix_with_instruction, read_instruction_data
from megatron_grm.stages.sft import SupervisedObjective
from megatron_grm.train import checkpoint as ckpt
from megatron_grm.train.loop import Trainer
from megatron_grm.train.producers import LengthBucketedProducer, Sample, pad_multiple_for

log = logging.getLogger(__name__)


@dataclass
class BootstrapSettings:
    """The ``bootstrap`` section of conf/bootstrap.yaml."""

    teacher_accuracy: float = 0.7
    instruction_ratio: float = 0.3
    variant: str = "compact"
    chat: bool = False
    eval_interval: int = 0  # held-out accuracy every this many steps (0: only at the end)
    max_new_tokens: int = 128  # for the held-out evaluation
    pad_multiple: int = 8
    pack: bool = False  # short samples share a row in a micro-batch (LengthBucketedProducer): less padding

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> BootstrapSettings:
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown bootstrap field(s): {unknown}")
        return cls(**values)


def teacher_samples(examples: Sequence[Example], tokenizer: Tokenizer, accuracy: float, variant: str, chat: bool,
                    seed: int) -> list[Sample]:
    """(prompt + teacher judgment) token ids with the loss on the judgment, one per example."""
    rng = random.Random(f"teacher:{seed}")
    return [tokenizer.encode_example(build_prompt(ex, variant=variant), teacher_judgment(ex, rng, accuracy), chat=chat)
            for ex in examples]


def train_bootstrap(cfg: Any) -> Trainer:
    """SFT on teacher judgments + instruction pairs; held-out Eq. 10 accuracy on the way and at the end."""
    run = prepare_run(cfg)
    t = run.trainer
    settings = BootstrapSettings.from_dict(run.extra.get("bootstrap"))
    data = run.extra.get("data", {}) or {}
    tokenizer_id = tokenizer_name(run)
    tokenizer = load_tokenizer(tokenizer_id)
    examples = load_examples(data["train"])
    judgments = teacher_samples(examples, tokenizer, settings.teacher_accuracy, settings.variant, settings.chat,
                                t.seed)
    instruction = read_instruction_data(data.get("instruction"), tokenizer, t.seq_length, chat=settings.chat)
    samples, per_source = mix_with_instruction(drop_too_long(judgments, t.seq_length, "teacher judgments"),
                                               instruction, settings.instruction_ratio, t.seed, "bootstrap")
    log.info("bootstrap mix: %d teacher judgments (teacher accuracy %.2f) + %d instruction samples %s", len(judgments),
             settings.teacher_accuracy, len(samples) - len(judgments), per_source)

    if settings.pack and use_te_spec():
        raise ValueError("bootstrap.pack=true needs attention that reads Megatron's mask (the local spec's SDPA "
                         "core); Transformer Engine's causal kernels would let packed samples see each other: "
                         "set bootstrap.pack=false")
    trainer = Trainer(run, metadata={"tokenizer": tokenizer_id, "stage": "bootstrap",
                                     "prompt": prompt_record(settings.variant, settings.chat)})
    producer = LengthBucketedProducer(samples, t.global_batch_size, t.micro_batch_size, t.seq_length,
                                      tokenizer.pad_id, t.seed, pad_multiple_for(run, settings.pad_multiple),
                                      uniform_length=run.parallel.pipeline_parallel > 1, pack=settings.pack)
    if not trainer.resume(producer) and t.load:
        trainer.load_weights(t.load)
    heldout = load_examples(data["heldout"]) if data.get("heldout") else []
    greedy = SamplingConfig(greedy=True, max_new_tokens=settings.max_new_tokens)
    results: dict[str, Any] = {"heldout_accuracy": [], "train_seconds": 0.0}

    def on_step(tr: Trainer, result) -> dict[str, float]:
        results["train_seconds"] += result.seconds
        step = tr.state.step
        if heldout and (step == t.max_steps or (settings.eval_interval and step % settings.eval_interval == 0)):
            acc = heldout_accuracy(tr, tokenizer, heldout, settings.variant, settings.chat, greedy, seed=t.seed)
            tr.logger.scalars(step, {"heldout_accuracy": acc}, prefix="eval/")
            results["heldout_accuracy"].append([step, acc, results["train_seconds"]])
        return {"padding_waste": producer.last_step_waste}

    start = time.perf_counter()
    trainer.fit(producer, SupervisedObjective(t.loss_tokens_only), on_step=on_step)
    results.update(seconds=time.perf_counter() - start, padding_waste=producer.padding_waste, steps=trainer.state.step)
    log.info("bootstrap: %d steps, %.0f s of training steps; held-out accuracy (step, accuracy, train s): %s; "
             "padding waste %.1f%%", trainer.state.step, results["train_seconds"], results["heldout_accuracy"],
             100 * producer.padding_waste)
    if is_rank0():
        ckpt.write_atomically(os.path.join(t.run_dir, "bootstrap_results.json"), json.dumps(results, indent=2))
    return trainer


@hydra.main(config_path=CONF_DIR, config_name="bootstrap", version_base="1.3")
def main(cfg) -> None:
    run_stage(train_bootstrap, cfg)


if __name__ == "__main__":
    main()
