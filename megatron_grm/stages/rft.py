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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hydra
import torch

from megatron_grm.data.examples import Example
from megatron_grm.data.sources import load_examples
from megatron_grm.data.tokenizer import load_tokenizer
from megatron_grm.parallel.distributed import barrier, is_rank0, true_on_any_rank
from megatron_grm.rollout.judgments import (
    PROMPT_TOO_LONG,
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
from megatron_grm.stages.instruction_data import (
    InstructionData,
    drop_too_long,
    mix_with_instruction,
    read_instruction_data,
    require_instruction_data,
)
from megatron_grm.stages.rft_shards import (
    check_manifest,
    done_marker,
    judgment_record,
    kept_judgment_ids,
    read_shards,
    shard_file,
    write_shard,
)
from megatron_grm.stages.sft import SupervisedObjective
from megatron_grm.train import checkpoint as ckpt
from megatron_grm.train.loop import Trainer
from megatron_grm.train.producers import LengthBucketedProducer, pad_multiple_for
from megatron_grm.train.signals import exit_for_requeue

log = logging.getLogger(__name__)

PHASES = ("sample", "train", "all")


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


# ------------------------------------------------------------------------------------ rejective sampling
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


def _write_results(run_dir: str, results: dict[str, Any]) -> None:
    """``<run_dir>/rft_results.json``: filter statistics, SFT mix, held-out accuracy, timings (rank 0)."""
    if is_rank0():  # whole or not at all: a rank killed mid-write must not leave half a file
        ckpt.write_atomically(os.path.join(run_dir, "rft_results.json"), json.dumps(results, indent=2, sort_keys=True))


@hydra.main(config_path=CONF_DIR, config_name="rft", version_base="1.3")
def main(cfg) -> None:
    run_stage(train_rft, cfg)


if __name__ == "__main__":
    main()
