"""Stage 2 — rule-based online RL with GRPO (paper §3.2).

Every rollout: sample G judgments per example from the current policy → reward +1 if correct by Eq. 10,
else −1 → group advantages → clipped policy gradient + β·KL(policy ‖ frozen reference) → optimizer step(s).
With ``data.val`` set, the same reward on held-out examples is measured at step 0, every
``grpo.val_interval`` steps and at the end, paired across steps (:mod:`megatron_grm.stages.reward_validation`).

    torchrun --nproc-per-node 2 -m megatron_grm.stages.grpo +experiment=grpo_tiny trainer.load=<RFT ckpt>
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import hydra
import torch

from megatron_grm.data.examples import Example
from megatron_grm.data.packing import collate_padded
from megatron_grm.data.sources import load_examples
from megatron_grm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_grm.parallel.device import use_cuda
from megatron_grm.parallel.distributed import max_over_ranks, mean_over_ranks, true_on_any_rank
from megatron_grm.parallel.loss_positions import LossPositions, output_at
from megatron_grm.parallel.vocab import vocab_parallel_logprobs_and_entropy
from megatron_grm.rollout.judgments import (
    PROMPT_TOO_LONG,
    JudgmentSample,
    report_too_long,
    sample_judgments,
    split_by_prompt_room,
)
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.spct import rule_reward
from megatron_grm.spct.grpo import group_advantages
from megatron_grm.stages.common import (
    CONF_DIR,
    prepare_run,
    prompt_record,
    prompt_template_mismatch,
    run_stage,
    tokenizer_name,
)
from megatron_grm.stages.reward_validation import RewardValidation
from megatron_grm.train import checkpoint as ckpt
from megatron_grm.train.loop import Batch, Trainer, forward_logprobs
from megatron_grm.train.losses import LossOutput, grpo_loss
from megatron_grm.train.producers import global_batch_indices

log = logging.getLogger(__name__)


@dataclass
class GRPOSettings:
    group_size: int = 4  # G judgments per example
    beta: float = 0.08  # KL coefficient
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # asymmetric clipping (DAPO-style) when set
    kl_estimator: str = "k3"
    aggregation: str = "sequence"  # "sequence": mean over tokens, then sequences (paper); "token"
    scale_by_std: bool = True  # False: Dr. GRPO advantages (r - mean)
    filter_zero_variance: bool = False  # drop groups whose G rewards are all equal from the update
    updates_per_rollout: int = 1  # optimizer steps per rollout batch (each on 1/U of it)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    template: str = "default"  # "compact" for the tiny CPU model
    chat: bool = True
    recompute_old_logprobs: bool = True  # old-policy logprobs from the policy, not the sampler (see below)
    offload_reference: bool = False  # keep the reference model in CPU memory between uses (GPU runs)
    max_tokens_in_flight: int = 32768
    val_samples: int = 4  # judgments per data.val example at each validation (stages/reward_validation.py)
    val_interval: int = 50  # validate every this many steps (and at step 0 and the last step); 0: those two only
    random_policy: bool = False  # allow trainer.load=null: start (and the KL reference) from random weights (tests)

    @property
    def old_logprobs_forward(self) -> bool:
        """Whether a rollout costs one more policy forward for the old-policy log-probabilities.

        With one update per rollout the policy that sampled is the one being updated, so its log-probabilities
        are the update's own forward, detached (the ratio is 1, as on-policy GRPO means); a separate forward
        with the same weights would compute the same numbers again. Only U > 1 updates need them kept from
        before the first one."""
        return self.recompute_old_logprobs and self.updates_per_rollout > 1

    def __post_init__(self) -> None:
        if self.kl_estimator == "k1" and self.beta:
            log.warning("grpo.kl_estimator=k1: as a loss term its expected gradient is zero, so beta=%s adds noise "
                        "and no pull towards the reference (k2: gradient of KL(policy||ref); k3: of KL(ref||policy))",
                        self.beta)


class GRPOObjective:
    """Clipped PG + β·KL on the policy's log-probabilities of the sampled judgment tokens.

    ``loss_tokens_only`` (``trainer.loss_tokens_only``): logits only at the judgment tokens, ``[1, n, vocab]``.
    """

    def __init__(self, s: GRPOSettings, loss_tokens_only: bool = True) -> None:
        self.s, self.loss_tokens_only = s, loss_tokens_only

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if not self.loss_tokens_only:
            return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])  # vocab-parallel logits
        with output_at(model, LossPositions(batch["loss_mask"])):
            return model(batch["tokens"], batch["position_ids"], batch["attention_mask"])

    def loss(self, logits: torch.Tensor, batch: Batch) -> LossOutput:
        if self.loss_tokens_only:
            positions = LossPositions(batch["loss_mask"])
            logprobs, entropy = vocab_parallel_logprobs_and_entropy(logits, positions.gather(batch["labels"]))
            logprobs, entropy = positions.scatter(logprobs), positions.scatter(entropy)
        else:
            logprobs, entropy = vocab_parallel_logprobs_and_entropy(logits, batch["labels"])
        return grpo_loss(
            logprobs, old_policy_logprobs(logprobs, batch["old_logprobs"], self.s), batch["ref_logprobs"],
            batch["advantages"], batch["loss_mask"],
            clip_eps=self.s.clip_eps, clip_eps_high=self.s.clip_eps_high, beta=self.s.beta,
            kl_estimator=self.s.kl_estimator, aggregation=self.s.aggregation, entropy=entropy,
        )


def old_policy_logprobs(logprobs: torch.Tensor, attached: torch.Tensor, s: GRPOSettings) -> torch.Tensor:
    """What the PG ratio divides by: the update's own log-probabilities, detached, when one update follows
    each rollout (the policy that sampled is the policy being updated); else those attached to the batch
    (a forward before the first of U updates, or the sampler's with ``recompute_old_logprobs=false``)."""
    if s.recompute_old_logprobs and not s.old_logprobs_forward:
        return logprobs.detach()
    return attached


def align_to_labels(values: list[float], prompt_length: int, seq_length: int) -> torch.Tensor:
    """Per-response-token values placed where training predicts that token (position t predicts t+1)."""
    out = torch.zeros(seq_length, dtype=torch.float32)
    start = prompt_length - 1
    out[start:start + len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


class RolloutProducer:
    """Each rollout samples G judgments for this DP rank's examples and yields U optimizer steps of it."""

    def __init__(self, trainer: Trainer, engine, reference: torch.nn.Module, tokenizer, examples, s: GRPOSettings,
                 seed: int, validation: RewardValidation | None = None) -> None:
        from megatron.core import parallel_state

        t = trainer.cfg.trainer
        self.trainer, self.engine, self.reference, self.tokenizer = trainer, engine, reference, tokenizer
        self.examples, self.s, self.seed, self.validation = examples, s, seed, validation
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.sequences_per_step = t.global_batch_size // self.dp_size
        per_rollout = t.global_batch_size * s.updates_per_rollout
        if per_rollout % (s.group_size * self.dp_size):
            raise ValueError(f"trainer.global_batch_size*grpo.updates_per_rollout={per_rollout} judgments per rollout "
                             f"must split into groups of G={s.group_size} on {self.dp_size} DP ranks")
        self.examples_per_rank = per_rollout // (s.group_size * self.dp_size)
        self.rollouts = 0  # rollouts done so far (global)
        self.cache: list[list[Batch]] = []
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ the algorithm
    def next_batch(self, step: int) -> list[Batch]:
        if not self.cache:
            self.cache = self._rollout()
        return self.cache.pop(0)

    def _rollout(self) -> list[list[Batch]]:
        s, t = self.s, self.trainer.cfg.trainer
        examples = [self.examples[i] for i in rollout_example_indices(
            self.rollouts, self.examples_per_rank, self.dp_rank, self.dp_size, len(self.examples), self.seed)]
        rng = random.Random(f"grpo:{self.seed}:{self.rollouts}:{self.dp_rank}")
        sampling = rollout_sampling(s, seed=self.seed + 7919 * self.rollouts)
        began = time.perf_counter()
        judged = sample_judgments(self.engine, self.tokenizer, examples, s.group_size, sampling, rng,
                                  variant=s.template, chat=s.chat)
        rollout_seconds = time.perf_counter() - began
        self.rollouts += 1

        rewards = [rule_reward(j.scores, label=examples[j.example_index].label) for j in judged]
        generated = [None if j.finish_reason == PROMPT_TOO_LONG else r for j, r in zip(judged, rewards)]
        adv = group_advantages(generated, s.group_size, scale_by_std=s.scale_by_std)
        keep = list(range(len(judged)))
        if s.filter_zero_variance:
            informative_anywhere = true_on_any_rank(len(adv.zero_variance_groups) < len(examples))
            keep = rows_to_train(len(judged), s.group_size, adv.zero_variance_groups, informative_anywhere)
        kept_advantages: list[float | None] = [adv.advantages[i] for i in keep]
        if not keep:  # every group here is filtered, not everywhere: one zero-weight row keeps the schedule fed
            keep, kept_advantages = [placeholder_row(judged, t.seq_length)], [None]
        rows, advantages, too_long = fit_rows([judged[i] for i in keep], kept_advantages, t.seq_length)
        if too_long:
            log.warning("rollout %d: %d judgment(s) with their prompt exceed trainer.seq_length=%d and are left "
                        "out of the update (zero weight)", self.rollouts, too_long, t.seq_length)
        microbatches = self._microbatches(rows, advantages, t.seq_length, t.micro_batch_size)
        new_tokens = sum(len(j.token_ids) for j in judged)
        self.last_stats = mean_over_ranks({
            "reward_mean": sum(rewards) / len(rewards),
            "accuracy": sum(j.correct for j in judged) / len(judged),
            "unparseable_fraction": sum(j.scores is None for j in judged) / len(judged),
            "truncated_fraction": sum(j.finish_reason == "length" for j in judged) / len(judged),
            "response_length": new_tokens / len(judged),
            "zero_variance_groups": len(adv.zero_variance_groups) / len(examples),
            "too_long_fraction": too_long / len(judged),
        })
        # Throughput of the whole rollout, as train/tokens_per_s is of the whole step: every DP replica's
        # judgment tokens over the slowest rank's time. The sampler-vs-trainer log-prob check: the worst rank.
        slowest = max_over_ranks({"seconds": rollout_seconds, "logprob_diff": self.engine.last_logprob_diff or 0.0})
        self.last_stats["rollout_tokens_per_s"] = (self.last_stats["response_length"] * len(judged) * self.dp_size
                                                   / max(slowest["seconds"], 1e-9))
        if self.engine.last_logprob_diff is not None:
            self.last_stats["rollout_logprob_max_abs_diff"] = slowest["logprob_diff"]
        return _split_steps(microbatches, s.updates_per_rollout)

    def _microbatches(self, judged: list[JudgmentSample], advantages: list[float], seq_length: int,
                      mbs: int) -> list[Batch]:
        """Training micro-batches with old-policy and reference log-probabilities and advantages attached."""
        # Pad the rollout with zero-weight copies to whole micro-batches, as many for each of the U updates,
        # with the real rows dealt out over the updates (padding appended at the end would leave the last
        # updates of a filtered rollout empty).
        order = rows_by_update(len(judged), padded_rows(len(judged), mbs, self.s.updates_per_rollout),
                               self.s.updates_per_rollout)
        judged = [judged[i] if i >= 0 else judged[-1] for i in order]
        advantages = [advantages[i] if i >= 0 else None for i in order]
        batches = []
        for k in range(0, len(judged), mbs):
            chunk = judged[k:k + mbs]
            docs = [(j.prompt_ids + j.token_ids, [0] * len(j.prompt_ids) + [1] * len(j.token_ids)) for j in chunk]
            batch = collate_padded(docs, seq_length=seq_length, pad_id=self.tokenizer.pad_id)
            weights = torch.tensor([0.0 if a is None else 1.0 for a in advantages[k:k + mbs]])
            batch["loss_mask"] = batch["loss_mask"] * weights[:, None]
            batch["advantages"] = torch.tensor([a or 0.0 for a in advantages[k:k + mbs]])[:, None].expand(
                -1, seq_length).contiguous()
            batch["old_logprobs"] = torch.stack(
                [align_to_labels(j.logprobs, len(j.prompt_ids), seq_length) for j in chunk])
            batches.append(batch)
        only = self.trainer.cfg.trainer.loss_tokens_only
        ref = _with_reference_on_device(self.reference, self.s.offload_reference,
                                        partial(forward_logprobs, loss_tokens_only=only), batches)
        old = forward_logprobs(self.trainer.model, batches, only) if self.s.old_logprobs_forward else None
        for i, batch in enumerate(batches):
            batch["ref_logprobs"] = ref[i] if ref is not None else torch.zeros_like(batch["old_logprobs"])
            if old is not None:
                batch["old_logprobs"] = old[i]
        return batches

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        state = {"rollouts": self.rollouts, "seed": self.seed, "num_examples": len(self.examples),
                 "example_order": "epoch_shuffled"}
        if self.validation is not None:
            state["validation"] = self.validation.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_examples") not in (None, len(self.examples)):
            raise ValueError(f"resuming GRPO with {len(self.examples)} examples; the checkpoint had "
                             f"{state['num_examples']}")
        self.rollouts = int(state["rollouts"])
        if state.get("example_order") != "epoch_shuffled":
            log.warning("this GRPO checkpoint took its examples in file order; the resumed run takes them "
                        "epoch-shuffled, so the rest of this epoch may repeat some examples and skip others")
        if self.validation is not None and "validation" in state:
            self.validation.load_state_dict(state["validation"])

    def rank_state_dict(self) -> dict[str, Any]:
        # Host copies: the cached log-probabilities come off the GPU, and a resume may see other devices.
        cache = [[{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in step]
                 for step in self.cache]
        return {"cache": cache, "last_stats": self.last_stats}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self.cache, self.last_stats = state["cache"], state["last_stats"]


def rollout_sampling(s: GRPOSettings, seed: int) -> SamplingConfig:
    """How rollouts (and validation) sample: the settings' temperature, top-p/top-k and judgment length."""
    return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          seed=seed)


def validation_due(step: int, interval: int, max_steps: int) -> bool:
    """After ``step`` steps: validate every ``interval`` steps and after the last (step 0 is validated
    before training starts)."""
    return step == max_steps or (interval > 0 and step % interval == 0)


def rollout_example_indices(rollout: int, per_rank: int, dp_rank: int, dp_size: int, num_examples: int,
                            seed: int) -> list[int]:
    """This DP rank's examples for a rollout: its slice of the endless stream that visits every example
    once per epoch in a fresh order (as SFT/RFT/MetaRM batches), not the data's file order, which puts
    one source's examples before another's."""
    start = (rollout * dp_size + dp_rank) * per_rank
    return global_batch_indices(start, per_rank, num_examples, seed)


def rows_to_train(rows: int, group_size: int, zero_variance_groups: list[int], informative_anywhere: bool
                  ) -> list[int]:
    """The rows of a rollout that enter the update when zero-variance groups are filtered (DAPO's dynamic
    sampling without the resampling): the informative groups' rows, or every row when no group on any DP
    rank is informative. Deciding that fallback per rank made the objective depend on how groups fall on
    DP ranks: a rank whose groups were all filtered trained them with advantage 0, adding their KL and
    tokens to the step; it now gets no real row."""
    if not informative_anywhere:
        return list(range(rows))
    dropped = set(zero_variance_groups)
    return [i for i in range(rows) if i // group_size not in dropped]


def padded_rows(rows: int, micro_batch_size: int, updates: int) -> int:
    """Rows after padding: a positive multiple of ``micro_batch_size * updates``, so the rollout splits into
    ``updates`` equal sets of whole micro-batches (zero-variance filtering leaves any number of rows)."""
    unit = micro_batch_size * updates
    return max(1, -(-rows // unit)) * unit


def rows_by_update(rows: int, total: int, updates: int) -> list[int]:
    """The order of a rollout's ``rows`` real rows in ``total`` update rows that split into ``updates``
    consecutive equal slices: real rows dealt round-robin, so every update gets ``rows // updates`` or one
    more; ``-1`` marks a zero-weight padding row. With one update the real rows keep their order."""
    per = total // updates
    slices = [list(range(u, rows, updates)) for u in range(updates)]
    return [i for part in slices for i in part + [-1] * (per - len(part))]


def row_fits(judgment: JudgmentSample, seq_length: int) -> bool:
    """Whether a judgment was generated and fits a training row with its prompt."""
    return (len(judgment.prompt_ids) + len(judgment.token_ids) <= seq_length
            and judgment.finish_reason != PROMPT_TOO_LONG)


def placeholder_row(judged: list[JudgmentSample], seq_length: int) -> int:
    """The row a rank whose groups were all filtered trains at zero weight: one that fits, so that this rank
    does not fail alone (and leave the others waiting) on a judgment that was never generated."""
    return next((i for i, j in enumerate(judged) if row_fits(j, seq_length)), 0)


def fit_rows(judged: list[JudgmentSample], advantages: list[float | None], seq_length: int
             ) -> tuple[list[JudgmentSample], list[float | None], int]:
    """Rows whose prompt plus judgment exceed ``seq_length`` become zero-weight copies of a row that fits.

    Examples are filtered on their prompt's length at load time, but a shuffled response order can
    tokenize a little longer; such a row (or one the engine had no room to generate) is counted and left
    out of the update rather than ending the run.
    """
    fits = [row_fits(j, seq_length) for j in judged]
    if all(fits):
        return judged, advantages, 0
    if not any(fits):
        raise ValueError(f"every judgment of this rollout with its prompt exceeds trainer.seq_length={seq_length}")
    donor = judged[fits.index(True)]
    rows = [j if ok else donor for j, ok in zip(judged, fits)]
    return rows, [a if ok else None for a, ok in zip(advantages, fits)], fits.count(False)


def _split_steps(microbatches: list[Batch], steps: int) -> list[list[Batch]]:
    if len(microbatches) % steps:
        raise ValueError(f"{len(microbatches)} micro-batches do not split into {steps} updates")
    per = len(microbatches) // steps
    return [microbatches[i * per:(i + 1) * per] for i in range(steps)]


def fitting_examples(examples: list[Example], tokenizer: Tokenizer, s: GRPOSettings, seq_length: int
                     ) -> list[Example]:
    """The examples whose prompt (responses in file order) leaves room for ``max_new_tokens`` judgment
    tokens within ``seq_length``; the rest are counted and left out, never discovered after a rollout."""
    kept, too_long = split_by_prompt_room(examples, tokenizer, s.template, s.chat, s.max_new_tokens, seq_length)
    report_too_long("GRPO", too_long, len(examples), s.max_new_tokens, seq_length, "trainer.seq_length")
    if not kept:
        raise ValueError(f"no example's prompt fits trainer.seq_length={seq_length} with "
                         f"grpo.max_new_tokens={s.max_new_tokens}")
    return kept


def _with_reference_on_device(reference, offload: bool, fn, batches):
    """Run ``fn`` with the reference model on the accelerator; park it in CPU memory afterwards if asked."""
    from megatron_grm.parallel.device import device

    if offload and use_cuda():
        reference.to(device())
        try:
            return fn(reference, batches)
        finally:
            reference.to("cpu")
            torch.cuda.empty_cache()
    return fn(reference, batches)


def kl_reference_folder(load: str | None, ckpt_root: str) -> str | None:
    """The ``iter_*`` folder this run starts from and keeps as its KL reference.

    ``trainer.load`` may name a checkpoints folder, which means its ``latest``; that moves if the RFT run it
    names goes on. A run records the folder it resolved in its checkpoints, and a resumed (requeued) run
    keeps that one: its reference must not change between attempts."""
    latest = ckpt.latest_checkpoint(ckpt_root)
    recorded = ckpt.read_metadata(latest).get("kl_reference") if latest else None
    resolved = os.path.abspath(ckpt.checkpoint_folder(load)).removesuffix(ckpt.REPLACED) if load else None
    if recorded and resolved and recorded != resolved:
        log.warning("trainer.load=%s now resolves to %s; this run resumes with the KL reference it started "
                    "from, %s", load, resolved, recorded)
    if recorded and not os.path.isdir(recorded) and os.path.isdir(recorded + ckpt.REPLACED):
        return recorded + ckpt.REPLACED  # its run crashed while re-saving that step: the complete copy
    return recorded or resolved


def build_reference(trainer: Trainer) -> torch.nn.Module:
    """A frozen copy of the starting policy, sharded exactly like it."""
    from megatron_grm.models.provider import build_model

    cfg = trainer.cfg
    reference = build_model(cfg.model, cfg.parallel, cfg.precision)
    reference.load_state_dict(trainer.unwrapped.state_dict())
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference.eval()


def train_grpo(cfg: Any) -> Trainer:
    run = prepare_run(cfg)
    s = GRPOSettings(**run.extra.get("grpo", {}))
    data = run.extra.get("data", {})
    if not data.get("train"):
        raise ValueError("data.train is not set (a JSONL path or e.g. arithmetic:train:512)")
    if not run.trainer.load and not s.random_policy:  # the policy to improve and the KL reference
        raise ValueError("trainer.load is not set: GRPO starts from the RFT checkpoint (also the frozen KL "
                         "reference); give its iter_* folder or its checkpoints folder (grpo.random_policy=true "
                         "starts from random weights: tests only)")
    tokenizer_id = tokenizer_name(run)
    tokenizer = load_tokenizer(tokenizer_id)
    examples = load_examples(data["train"], on_error=data.get("bad_records", "fail"), seed=run.trainer.seed)
    examples = fitting_examples(examples, tokenizer, s, run.trainer.seq_length)
    trainer = Trainer(run, metadata={"tokenizer": tokenizer_id, "stage": "grpo",
                                     "grpo": dataclasses.asdict(s), "prompt": prompt_record(s.template, s.chat)})
    from megatron_grm.rollout.engine import RolloutEngine

    engine = RolloutEngine(trainer.model, tokenizer, max_tokens_in_flight=s.max_tokens_in_flight,
                           debug_logprobs=bool(data.get("debug_logprobs", False)))
    # The reference is the *starting* policy: the loaded checkpoint (or, for tests, the seeded initial
    # weights). On a resumed run the policy weights are then replaced by the run's own latest checkpoint.
    start = kl_reference_folder(run.trainer.load, trainer.ckpt_root)
    mismatch = prompt_template_mismatch(start, s.template, s.chat, ("grpo.template", "grpo.chat"))
    if mismatch:  # training on a new template can be meant; its first rollouts read unseen prompts
        log.warning("%s (unless training on a new template is the point)", mismatch)
    if start:
        trainer.metadata["kl_reference"] = start
        trainer.load_weights(start)
    reference = build_reference(trainer)
    if s.offload_reference and use_cuda():
        reference.to("cpu")  # parked from the start; moved to the GPU only for its forward passes
    validation = None
    if data.get("val"):
        val_examples = load_examples(data["val"], on_error=data.get("bad_records", "fail"), seed=run.trainer.seed)
        validation = RewardValidation(engine, tokenizer, fitting_examples(val_examples, tokenizer, s,
                                                                          run.trainer.seq_length),
                                      s.val_samples, rollout_sampling(s, seed=run.trainer.seed), s.template, s.chat,
                                      seed=run.trainer.seed)
    producer = RolloutProducer(trainer, engine, reference, tokenizer, examples, s, seed=run.trainer.seed,
                               validation=validation)
    trainer.resume(producer)

    def validate(tr: Trainer) -> None:
        tr.logger.scalars(tr.state.step, validation.run(tr.state.step), prefix="val/")

    if validation is not None and validation.baseline is None:
        if trainer.state.step:
            log.warning("GRPO validation: the checkpoint holds no step-0 validation; gains are measured from step %d",
                        trainer.state.step)
        validate(trainer)

    def after_step(tr: Trainer, result) -> dict[str, float]:
        stats, producer.last_stats = producer.last_stats, {}
        if validation is not None and validation_due(tr.state.step, s.val_interval, run.trainer.max_steps):
            validate(tr)
        return {f"rollout/{k}": v for k, v in stats.items()}

    trainer.fit(producer, GRPOObjective(s, run.trainer.loss_tokens_only), on_step=after_step)
    return trainer


@hydra.main(config_path=CONF_DIR, config_name="grpo", version_base="1.3")
def main(cfg) -> None:
    run_stage(train_grpo, cfg)


if __name__ == "__main__":
    main()
