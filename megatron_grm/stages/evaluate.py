"""Evaluation with inference-time scaling (paper §4, §5): greedy, voting@k and MetaRM@k on each benchmark.

    torchrun --nproc-per-node 2 -m megatron_grm.stages.evaluate +experiment=eval_tiny \\
        trainer.load=runs/rft/checkpoints eval.metarm=runs/metarm/checkpoints

sample → meta-score → vote → score → tables:
1. sample: per example one greedy judgment, max(k) judgments at temperature 0.5 (each showing the
   responses in a fresh random order, paper §4.1) and the LLM-as-a-judge baseline. Every k reuses the
   first k draws of the same sample, so the curve over k is one experiment, not len(ks) experiments.
2. meta-score: the MetaRM rates each draw (paper §4.2).
3. vote: voting@k sums the first k draws' scores, MetaRM@k sums the k_meta (default k/2) best-rated ones;
   the argmax is the predicted best response (ties at random, seeded). Greedy is judged by Eq. 10.
4. score: accuracy per benchmark and category, ROC-AUC on single-response sets → ``results.json``,
   ``results.md`` (the paper's table: rows = methods, columns = benchmarks), ``scaling.png`` and
   ``outcomes.jsonl`` (each example's verdict per method, for paired comparisons of two runs:
   ``python tools/compare_evals.py RUN_A RUN_B``).

Every draw goes to ``<run_dir>/samples.jsonl`` as it is made (``stages/eval_draws.py``: a restarted run
samples only what is missing). ``eval.samples_in=FILE`` supplies draws in that format, e.g. from another
run: whatever it holds is not sampled again, and with nothing missing no model is built at all.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch

from megatron_grm.data.examples import Example, permute_example
from megatron_grm.data.readers.common import ReadResult
from megatron_grm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_grm.parallel.distributed import barrier, data_parallel_rank_and_size, is_rank0, true_on_any_rank
from megatron_grm.rollout.judgments import (
    encode_grm_prompt,
    generate_where_room,
    prompt_length,
    render_prompt,
    response_orders,
)
from megatron_grm.rollout.sampling import SamplingConfig
from megatron_grm.spct import (
    choice_scores,
    default_k_meta,
    is_correct,
    judge_baseline_prompt,
    macro_average,
    meta_filter,
    parse_best_choice,
    per_category,
    results_markdown,
    roc_auc,
    single_response_vote,
    vote,
    voted_scores,
)
from megatron_grm.stages.common import CONF_DIR, prepare_run, prompt_template_mismatch, run_stage, tokenizer_name
from megatron_grm.stages.eval_compare import OUTCOMES_FILE
from megatron_grm.stages.eval_draws import (
    GREEDY,
    JUDGE,
    SAMPLE,
    Draw,
    DrawStore,
    append_draws,
    drop_torn_tail,
    rewrite_draws,
)
from megatron_grm.train.signals import exit_for_requeue, stop_request

log = logging.getLogger(__name__)

SAMPLES_FILE, MANIFEST_FILE = "samples.jsonl", "samples_manifest.json"
RESULTS_JSON, RESULTS_MD, SCALING_PNG = "results.json", "results.md", "scaling.png"
JUDGE_ROW = "LLM-as-a-judge"


# ------------------------------------------------------------------------------------------ settings
@dataclass
class BenchmarkSpec:
    """One column of the table: examples named by a data spec (:mod:`megatron_grm.data.sources`)."""

    name: str
    data: str  # e.g. path.jsonl, rmb:<root>:pairwise, arithmetic:heldout:400
    files: list[str] | None = None  # rmb only: files under <root>/<Pairwise_set|BoN_set>/, read in place
    limit: int | None = None  # the first `limit` usable examples


@dataclass
class EvalSettings:
    benchmarks: list[BenchmarkSpec]
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    k_meta: int | None = None  # judgments MetaRM@k keeps; None: k/2 (paper), at least 1
    temperature: float = 0.5  # paper §4.1
    max_new_tokens: int = 1024
    variant: str = "default"  # GRM template (spct.templates)
    chat: bool = True
    greedy: bool = True
    judge_baseline: bool = True
    metarm: str | None = None  # MetaRM checkpoint (root or iter_* folder); None: MetaRM@k from samples_in only
    samples_in: str | None = None  # draws already made (this stage's sample-file format)
    per_category_depth: int | None = None  # category path components in the breakdown (None: all)
    chunk_examples: int = 64  # examples per generate call and data-parallel rank, between sample-file writes
    max_batch_size: int = 256
    max_tokens_in_flight: int = 32768

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvalSettings:
        values = dict(values)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown eval field(s) {unknown}; known: {sorted(known)}")
        specs = values.pop("benchmarks", None) or []
        if not specs:
            raise ValueError("eval.benchmarks is empty: name at least one {name, data} benchmark")
        settings = cls(benchmarks=[BenchmarkSpec(**dict(s)) for s in specs], **values)
        names = [b.name for b in settings.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.benchmarks: duplicate names {names}")
        if not settings.ks or min(settings.ks) < 1:
            raise ValueError(f"eval.ks={settings.ks}: need positive k values")
        settings.ks = sorted(set(int(k) for k in settings.ks))
        if settings.k_meta is not None and settings.k_meta < 1:
            raise ValueError(f"eval.k_meta={settings.k_meta}: must be >= 1 (or null for k/2)")
        return settings

    @property
    def max_k(self) -> int:
        return max(self.ks)

    def k_meta_for(self, k: int) -> int:
        return default_k_meta(k) if self.k_meta is None else min(self.k_meta, k)


# ------------------------------------------------------------------------------------------ benchmarks
@dataclass
class Benchmark:
    name: str
    examples: list[Example]
    skipped: Counter[str]  # reason -> examples left out (never silently)
    best_identical: int = 0  # used examples whose best response is, text for text, also a losing one


def best_is_identical_to_another(example: Example) -> bool:
    """Whether the labelled best response equals another response (whitespace aside): Eq. 10 needs the best
    to score strictly higher, so no judgment of such an example can count as correct (RMB has a few)."""
    if example.num_responses < 2:
        return False
    best = example.responses[example.label].strip()
    return any(r.strip() == best for i, r in enumerate(example.responses) if i != example.label)


def load_benchmark(spec: BenchmarkSpec, unusable: Callable[[Example], str | None], seed: int) -> Benchmark:
    """A benchmark's usable examples (in file order, the first ``limit``) and counts of the ones skipped.

    An example is skipped when its record is malformed ("bad_record"), the tokenizer cannot encode it (the
    demo's character tokenizer knows only ASCII) or its prompt plus ``max_new_tokens`` does not fit the
    model's context: the policy is skip-and-count, and the counts are reported next to the results. Draws
    are keyed by example id, so a repeated id is an error rather than two examples sharing judgments.
    """
    from megatron_grm.data.sources import read_examples

    result = _read_rmb_files(spec) if spec.files else read_examples(spec.data, on_error="skip", seed=seed)
    _check_unique_ids(spec, result.examples)
    usable, skipped = [], Counter()
    if result.errors:
        skipped["bad_record"] = len(result.errors)
    for example in result.examples:
        if spec.limit is not None and len(usable) >= spec.limit:
            break
        reason = unusable(example)
        if reason is None:
            usable.append(example)
        else:
            skipped[reason] += 1
    if not usable:
        raise ValueError(f"benchmark {spec.name}: no usable example in {spec.data} (skipped: {dict(skipped)})")
    if skipped:
        log.warning("benchmark %s: %d usable examples, skipped %s", spec.name, len(usable), dict(skipped))
    identical = [e.id for e in usable if best_is_identical_to_another(e)]
    if identical:
        log.warning("benchmark %s: in %d example(s) the best response is identical to another (first: %s); Eq. 10 "
                    "(a tie is wrong) never counts them correct. Kept, as the benchmark has them; results.json "
                    "counts them", spec.name, len(identical), ", ".join(identical[:3]))
    return Benchmark(spec.name, usable, skipped, len(identical))


def _check_unique_ids(spec: BenchmarkSpec, examples: Sequence[Example]) -> None:
    first: dict[str, int] = {}
    for index, example in enumerate(examples):
        earlier = first.setdefault(example.id, index)
        if earlier != index:
            raise ValueError(f"benchmark {spec.name} ({spec.data}): example id {example.id!r} is used by examples "
                             f"#{earlier} and #{index} (0-based, in reading order); ids must be unique because "
                             "judgments are stored and matched by id")


def _read_rmb_files(spec: BenchmarkSpec) -> ReadResult:
    from megatron_grm.data.readers.rmb import SUBSET_DIRS, read_rmb_file

    kind, _, rest = spec.data.partition(":")
    root, _, subset = rest.rpartition(":")
    if kind != "rmb" or subset not in SUBSET_DIRS:
        raise ValueError(f"benchmark {spec.name}: 'files' needs data=rmb:<root>:<pairwise|bon>, got {spec.data!r}")
    result = ReadResult()
    for name in spec.files or []:
        part = read_rmb_file(Path(root) / SUBSET_DIRS[subset] / name, subset, on_error="skip")
        for err in part.errors:
            log.warning("skipped bad record: %s", err)
        result.examples.extend(part.examples)
        result.errors.extend(part.errors)
    return result


def prompt_check(tokenizer: Tokenizer, s: EvalSettings, context_limit: int) -> Callable[[Example], str | None]:
    """Why an example cannot be evaluated ("untokenizable", "too_long"), or None when it can."""

    def unusable(example: Example) -> str | None:
        try:
            lengths = [prompt_length(tokenizer, example, s.variant, s.chat)]
            if s.judge_baseline and example.num_responses >= 2:
                identity = list(range(example.num_responses))
                lengths.append(len(encode_grm_prompt(tokenizer, judge_prompt_text(example, identity), s.chat)))
        except ValueError:
            return "untokenizable"
        return "too_long" if max(lengths) + s.max_new_tokens > context_limit else None

    return unusable


def judge_prompt_text(example: Example, perm: Sequence[int]) -> str:
    """The LLM-as-a-judge baseline's prompt (paper §5 baselines) on the responses in order ``perm``, before
    chat formatting (encoded like the GRM's, by ``encode_grm_prompt``)."""
    shown = permute_example(example, perm)
    return judge_baseline_prompt(shown.context, shown.responses)


# ------------------------------------------------------------------------------------------ 1. sample
@dataclass
class Job:
    """Draws ``first .. first+n-1`` of one method for some examples of one benchmark."""

    benchmark: str
    method: str
    n: int
    first: int
    examples: list[Example]


def missing_jobs(benchmarks: Sequence[Benchmark], store: DrawStore, s: EvalSettings) -> list[Job]:
    """What still has to be generated, grouped so that one generate call serves many examples."""
    jobs: list[Job] = []
    for b in benchmarks:
        wanted = [(SAMPLE, s.max_k)]
        if s.greedy:
            wanted.append((GREEDY, 1))
        if s.judge_baseline:
            wanted.append((JUDGE, 1))
        for method, count in wanted:
            groups: dict[int, list[Example]] = defaultdict(list)
            for e in b.examples:
                if method == JUDGE and e.num_responses < 2:
                    continue  # the baseline compares responses; single-response sets have none to compare
                have = len(store.get(b.name, e.id, method))
                if have < count:
                    groups[have].append(e)
            jobs.extend(Job(b.name, method, count - first, first, exs) for first, exs in sorted(groups.items()))
    return jobs


def generate_draws(engine, tokenizer: Tokenizer, job: Job, examples: Sequence[Example], s: EvalSettings,
                   seed: int) -> list[Draw]:
    """One generate call: the job's draws for ``examples`` (this rank's share of one chunk)."""
    from megatron_grm.rollout.judgments import sample_judgments

    if not examples:
        return []
    # An example's response orders and token draws depend on the seed, the benchmark, the method, the
    # draw number it starts at and the example itself, not on the chunk or rank it lands in.
    tag = f"{seed}:{job.benchmark}:{job.method}:{job.first}"
    call_seed = zlib.crc32(tag.encode())
    if job.method == JUDGE:
        return _judge_draws(engine, tokenizer, job, examples, s, tag, call_seed)
    sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              greedy=job.method == GREEDY, seed=call_seed)
    judged = sample_judgments(engine, tokenizer, examples, job.n, sampling, tag, variant=s.variant, chat=s.chat)
    return [Draw(job.benchmark, examples[j.example_index].id, job.method, job.first + k % job.n, j.scores,
                 j.permutation, j.text) for k, j in enumerate(judged)]


def _judge_draws(engine, tokenizer: Tokenizer, job: Job, examples: Sequence[Example], s: EvalSettings,
                 tag: str, call_seed: int) -> list[Draw]:
    """The LLM-as-a-judge baseline: greedy, on shuffled responses, its choice read by parse_best_choice."""
    perms = [response_orders(e, 1, tag)[0] for e in examples]
    prompts = [encode_grm_prompt(tokenizer, judge_prompt_text(e, p), s.chat)
               for e, p in zip(examples, perms)]
    # A shown order that tokenizes longer than the checked one is not generated: no choice (incorrect).
    samples = generate_where_room(engine, prompts, SamplingConfig(max_new_tokens=s.max_new_tokens, greedy=True,
                                                                  seed=call_seed))
    draws = []
    for e, perm, sample in zip(examples, perms, samples):
        if sample is None:
            draws.append(Draw(job.benchmark, e.id, JUDGE, job.first, None, perm, ""))
            continue
        shown = parse_best_choice(sample.text or "", e.num_responses)
        choice = None if shown is None else perm[shown]
        draws.append(Draw(job.benchmark, e.id, JUDGE, job.first, choice_scores(choice, e.num_responses), perm,
                          sample.text or ""))
    return draws


def sample_missing(run, tokenizer: Tokenizer, jobs: Sequence[Job], store: DrawStore, s: EvalSettings,
                   samples_path: str) -> None:
    """Generate every missing draw with the GRM, chunk by chunk; each chunk is appended to the sample file
    (so a preempted run loses at most one chunk) and a stop signal ends the stage with exit code 75."""
    from megatron_grm.models.metarm import load_model_weights
    from megatron_grm.models.provider import build_model
    from megatron_grm.rollout import RolloutEngine

    model = build_model(run.model, run.parallel, run.precision)
    if run.trainer.load:
        log.info("GRM weights from %s", load_model_weights(model, run.trainer.load, run.model))
    else:
        log.warning("trainer.load is not set: evaluating a randomly initialised GRM")
    engine = RolloutEngine(model, tokenizer, max_batch_size=s.max_batch_size,
                           max_tokens_in_flight=s.max_tokens_in_flight)
    dp_rank, dp_size = data_parallel_rank_and_size()
    stop = stop_request()
    chunks = [(job, c) for job in jobs for c in range(0, len(job.examples), s.chunk_examples * dp_size)]
    bar = _progress(len(chunks), "evaluate: sampling")
    for job, start in chunks:
        bar.set_description(f"evaluate: {job.benchmark} {job.method} x{job.n}")
        part = job.examples[start:start + s.chunk_examples * dp_size][dp_rank::dp_size]
        draws = _gather(generate_draws(engine, tokenizer, job, part, s, run.trainer.seed))
        store.add(draws)
        append_draws(samples_path, draws)
        bar.update(1)
        if true_on_any_rank(stop.requested):
            log.warning("stopping on signal: %d draws are in %s; rerun the same command to continue",
                        len(store.all()), samples_path)
            exit_for_requeue(f"evaluation: draws in {samples_path}")
    bar.close()
    del engine, model
    gc.collect()


# ------------------------------------------------------------------------------------------ 2. meta-score
def meta_score_missing(run, tokenizer: Tokenizer, benchmarks: Sequence[Benchmark], store: DrawStore,
                       s: EvalSettings, samples_path: str) -> int:
    """Rate the first max(k) draws of every example with the MetaRM; returns how many inputs were cut.

    Each scored chunk's draws are appended to the sample file again, now with their ``meta_score`` (a later
    line of a draw replaces an earlier one when the file is read), so a preempted run keeps what it
    scored, and a stop signal ends the stage with exit code 75 between chunks."""
    from megatron_grm.models.metarm import attach_metarm_head, load_model_weights, metarm_input_ids, metarm_logits
    from megatron_grm.models.provider import build_model

    todo: list[tuple[Draw, Example]] = [
        (d, e) for b in benchmarks for e in b.examples
        for d in store.get(b.name, e.id, SAMPLE)[:s.max_k] if d.meta_score is None]
    if not todo:
        return 0
    if any(d.permutation is None for d, _ in todo):
        raise ValueError("draws without 'permutation' cannot be meta-scored: the MetaRM reads the prompt they answered")
    model = attach_metarm_head(build_model(run.model, run.parallel, run.precision), seed=run.trainer.seed)
    log.info("MetaRM weights from %s", load_model_weights(model, s.metarm, run.model))
    limit = run.model.max_position_embeddings
    inputs = [metarm_input_ids(tokenizer, render_prompt(e, d.permutation, s.variant, False, tokenizer, s.chat),
                               d.text, limit) for d, e in todo]
    _, dp_size = data_parallel_rank_and_size()
    step = max(1, s.chunk_examples * s.max_k * dp_size)
    stop = stop_request()
    bar = _progress(-(-len(todo) // step), "evaluate: MetaRM")
    for start in range(0, len(todo), step):
        ids = [i for i, _ in inputs[start:start + step]]
        logits = metarm_logits(model, ids, run.trainer.micro_batch_size, tokenizer.pad_id)
        for (draw, _), logit in zip(todo[start:start + step], logits):
            draw.meta_score = logit
        append_draws(samples_path, [draw for draw, _ in todo[start:start + step]])
        bar.update(1)
        if true_on_any_rank(stop.requested):
            log.warning("stopping on signal: %d of %d draws meta-scored, kept in %s; rerun the same command to "
                        "continue", min(start + step, len(todo)), len(todo), samples_path)
            exit_for_requeue(f"evaluation: meta scores in {samples_path}")
    bar.close()
    del model
    gc.collect()
    return sum(cut for _, cut in inputs)


# ------------------------------------------------------------------------------------------ 3. vote
def voted_correct(example: Example, score_lists: Sequence[Sequence[int] | None], rng: random.Random) -> bool:
    """Whether the vote over these judgments picks the labelled best response (n = 1: the right verdict)."""
    if example.num_responses == 1:
        return single_response_vote(score_lists, rng) == example.label
    return vote(score_lists, rng, example.num_responses) == example.label


def is_tied(example: Example, score_lists: Sequence[Sequence[int] | None]) -> bool:
    """Whether the vote had to be decided at random (reported, so a coin flip is not read as skill)."""
    totals = voted_scores(score_lists, example.num_responses)
    if example.num_responses == 1:
        return 2 * totals[0] == sum(s is not None for s in score_lists)
    return totals.count(max(totals)) > 1


@dataclass
class MethodOutcome:
    """Per-example results of one method on one benchmark (None: the method has no result here)."""

    correct: list[bool]
    rewards: list[float]  # summed score of the single response (for ROC-AUC); empty for n >= 2
    ties: int = 0  # examples whose vote was decided at random


def method_outcome(method: str, k: int | None, b: Benchmark, store: DrawStore, s: EvalSettings,
                   seed: int) -> MethodOutcome | None:
    """Greedy (Eq. 10 on the one judgment), Voting@k, MetaRM@k or the judge baseline on one benchmark."""
    correct, rewards, ties = [], [], 0
    for e in b.examples:
        # Tie-breaks: seeded per example and k, independent of order, and shared by Voting@k and MetaRM@k
        # (so MetaRM@1, which keeps the one draw there is, equals Voting@1 exactly).
        rng = random.Random(f"{seed}:{b.name}:{e.id}:{k}")
        if method == GREEDY:
            draws = store.get(b.name, e.id, GREEDY)[:1]
            if not draws:
                return None
            correct.append(is_correct(draws[0].scores, label=e.label))
            kept = [draws[0].scores]
        elif method == JUDGE:
            draws = store.get(b.name, e.id, JUDGE)[:1]
            if e.num_responses < 2 or not draws:
                return None
            correct.append(draws[0].scores is not None and draws[0].scores[e.label] == 1)
            continue
        else:
            draws = store.get(b.name, e.id, SAMPLE)[:k]
            if len(draws) < k:
                return None
            kept = [d.scores for d in draws]
            if method == "metarm":
                if any(d.meta_score is None for d in draws):
                    return None
                kept = meta_filter(kept, [d.meta_score for d in draws], s.k_meta_for(k))
            correct.append(voted_correct(e, kept, rng))
            ties += is_tied(e, kept)
        if e.num_responses == 1:
            rewards.append(float(voted_scores(kept, 1)[0]))
    return MethodOutcome(correct, rewards, ties)


# ------------------------------------------------------------------------------------------ 4. score
def method_rows(s: EvalSettings) -> list[tuple[str, str, int | None]]:
    """(row name, method, k) in the table's order: greedy, the baseline, Voting@k, MetaRM@k."""
    rows: list[tuple[str, str, int | None]] = [("Greedy", GREEDY, None), (JUDGE_ROW, JUDGE, None)]
    rows += [(f"Voting@{k}", "voting", k) for k in s.ks]
    rows += [(f"MetaRM@{k}", "metarm", k) for k in s.ks]
    return rows


def score_benchmarks(benchmarks: Sequence[Benchmark], store: DrawStore, s: EvalSettings, seed: int) -> dict[str, Any]:
    """Accuracy per method and benchmark, the per-category breakdown and ROC-AUC (single-response sets)."""
    accuracy: dict[str, dict[str, float]] = {}
    categories: dict[str, dict[str, dict[str, float]]] = {}
    aucs: dict[str, dict[str, float]] = {}
    ties: dict[str, dict[str, float]] = {}
    per_example: list[dict[str, Any]] = []
    for row, method, k in method_rows(s):
        for b in benchmarks:
            outcome = method_outcome(method, k, b, store, s, seed)
            if outcome is None:
                continue
            accuracy.setdefault(row, {})[b.name] = sum(outcome.correct) / len(outcome.correct)
            per_example += [{"benchmark": b.name, "method": row, "example_id": e.id, "correct": bool(c)}
                            for e, c in zip(b.examples, outcome.correct)]
            if method in ("voting", "metarm"):
                ties.setdefault(row, {})[b.name] = outcome.ties / len(outcome.correct)
            by_category = per_category(outcome.correct, [e.category or b.name for e in b.examples],
                                       s.per_category_depth)
            categories.setdefault(row, {})[b.name] = by_category
            labels = [e.label for e in b.examples if e.num_responses == 1]
            if outcome.rewards and 0 < sum(labels) < len(labels):
                aucs.setdefault(row, {})[b.name] = roc_auc(outcome.rewards, labels)
    names = [b.name for b in benchmarks]
    overall = {row: (macro_average(per) if all(n in per for n in names) else None) for row, per in accuracy.items()}
    return {"accuracy": accuracy, "overall": overall, "per_category": categories, "roc_auc": aucs,
            "tie_rate": ties, "per_example": per_example}


def scaling_curves(scores: dict[str, Any], s: EvalSettings) -> dict[str, Any]:
    """Overall accuracy against k for voting and MetaRM-guided voting (the paper's Figure 1 axes)."""
    overall = scores["overall"]
    curves: dict[str, Any] = {"k": s.ks}
    for label, prefix in (("Voting", "Voting"), ("MetaRM", "MetaRM")):
        values = [overall.get(f"{prefix}@{k}") for k in s.ks]
        if all(v is not None for v in values):
            curves[label] = values
    for label in ("Greedy", JUDGE_ROW):
        if overall.get(label) is not None:
            curves[label] = overall[label]
    return curves


def write_outputs(run_dir: str, benchmarks: Sequence[Benchmark], scores: dict[str, Any], s: EvalSettings,
                  extra: dict[str, Any]) -> None:
    """results.json (fractions), results.md (the paper-shaped table, percent) and scaling.png."""
    from megatron_grm.stages.plots import plot_scaling

    names = [b.name for b in benchmarks]
    curves = scaling_curves(scores, s)
    examples = {b.name: {"used": len(b.examples), "skipped": dict(b.skipped)}
                | ({"best_identical_to_another": b.best_identical} if b.best_identical else {}) for b in benchmarks}
    report = {**{k: v for k, v in scores.items() if k != "per_example"}, "scaling": curves, "examples": examples,
              "settings": {k: v for k, v in asdict(s).items() if k != "benchmarks"}
              | {"benchmarks": [asdict(b) for b in s.benchmarks]}, **extra}
    Path(run_dir, RESULTS_JSON).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    Path(run_dir, OUTCOMES_FILE).write_text("".join(json.dumps(r) + "\n" for r in scores["per_example"]))

    note = "Accuracy (%): greedy is judged by Eq. 10 (a tie is wrong); voting picks the argmax of the summed scores"
    note += " (ties at random: how often, below)"
    if any(row.startswith("MetaRM@") for row in scores["accuracy"]):
        note += f"; MetaRM@k votes over the k_meta = {'k/2' if s.k_meta is None else s.k_meta} best-rated judgments"
    lines = [f"# Evaluation ({', '.join(names)})", "", note + ".", "", results_markdown(scores["accuracy"], names)]
    if any(v > 0 for per in scores["tie_rate"].values() for v in per.values()):
        lines += ["Votes decided by the seeded coin (%, ties among the top summed scores; unparseable judgments add "
                  "nothing):", "", results_markdown(scores["tie_rate"], names, overall=False)]
    if scores["roc_auc"]:
        single = [n for n in names if any(n in per for per in scores["roc_auc"].values())]
        lines += ["ROC-AUC of the voted reward (single-response examples):", "",
                  results_markdown(scores["roc_auc"], single, overall=False)]
    lines += ["Examples: " + "; ".join(
        f"{n}: {e['used']} used" + "".join(f", {c} {r}" for r, c in sorted(e["skipped"].items()))
        + (f" ({e['best_identical_to_another']} with the best response identical to another: never correct)"
           if "best_identical_to_another" in e else "")
        for n, e in examples.items()), ""]
    Path(run_dir, RESULTS_MD).write_text("\n".join(lines))
    plot_scaling(curves, str(Path(run_dir, SCALING_PNG)), title=f"Inference-time scaling ({', '.join(names)})")


# ------------------------------------------------------------------------------------------ the stage
def evaluate(cfg: Any) -> dict[str, Any]:
    """Sample what is missing → meta-score → vote → score → tables and plot; returns the results."""
    run = prepare_run(cfg, training=False)
    s = EvalSettings.from_dict(run.extra.get("eval", {}))
    mismatch = prompt_template_mismatch(run.trainer.load, s.variant, s.chat, ("eval.variant", "eval.chat"))
    if mismatch:  # its judgments would measure the template, not the model
        raise ValueError(mismatch)
    run_dir = run.trainer.run_dir
    tokenizer_id = tokenizer_name(run)
    tokenizer = load_tokenizer(tokenizer_id)
    check = prompt_check(tokenizer, s, run.model.max_position_embeddings)
    benchmarks = [load_benchmark(spec, check, run.trainer.seed) for spec in s.benchmarks]

    check_manifest(run_dir, sampling_manifest(run, s))
    store = DrawStore()
    samples_path = os.path.join(run_dir, SAMPLES_FILE)
    if is_rank0() and os.path.exists(samples_path):
        dropped = drop_torn_tail(samples_path)
        if dropped:
            log.warning("%s: cut %d bytes of a line an earlier attempt did not finish writing; its draws are "
                        "sampled again", samples_path, dropped)
    barrier()  # every rank reads the file as rank 0 left it
    if s.samples_in and os.path.exists(s.samples_in):  # an import: its meta scores may be another MetaRM's
        log.info("%s: %d draws reused", s.samples_in, store.read(s.samples_in, benchmarks, meta_scores=not s.metarm))
    if os.path.exists(samples_path):  # this run's own draws (the manifest vouches for their settings)
        log.info("%s: %d draws reused", samples_path, store.read(samples_path, benchmarks, keep_others=True))

    jobs = missing_jobs(benchmarks, store, s)
    if jobs:
        sample_missing(run, tokenizer, jobs, store, s, samples_path)
    truncated = meta_score_missing(run, tokenizer, benchmarks, store, s, samples_path) if s.metarm else 0
    rewrite_draws(samples_path, store.all(), store.others)

    scores = score_benchmarks(benchmarks, store, s, run.trainer.seed)
    if is_rank0():
        write_outputs(run_dir, benchmarks, scores, s, {"metarm_inputs_truncated": truncated})
        print(results_markdown(scores["accuracy"], [b.name for b in benchmarks]), flush=True)
    return scores


# ------------------------------------------------------------------------------------------ plumbing
def sampling_manifest(run, s: EvalSettings) -> dict[str, Any]:
    """What the draws in a run's sample file are draws *of*: reusing them under other settings would mix
    two experiments in one table."""
    from megatron_grm.train.checkpoint import checkpoint_folder

    def where(path: str | None) -> str | None:
        return None if not path else os.path.abspath(checkpoint_folder(path))

    return {"grm": where(run.trainer.load), "metarm": where(s.metarm), "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens, "variant": s.variant, "chat": s.chat, "seed": run.trainer.seed,
            "tokenizer": tokenizer_name(run)}


def check_manifest(run_dir: str, manifest: dict[str, Any]) -> None:
    """Refuse to continue a run folder whose sample file was drawn with other settings (rank 0 writes it)."""
    path = os.path.join(run_dir, MANIFEST_FILE)
    old = json.loads(Path(path).read_text()) if os.path.exists(path) else None
    barrier()  # every rank has read it before rank 0 may write it
    if old is not None and old != manifest:
        changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        raise ValueError(f"{run_dir} holds draws made with other settings ({', '.join(changed)}: "
                         f"{[old.get(k) for k in changed]} -> {[manifest.get(k) for k in changed]}); "
                         "use another trainer.run_dir, or pass its samples.jsonl as eval.samples_in")
    if old is None and is_rank0():
        Path(path).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _gather(draws: list[Draw]) -> list[Draw]:
    """Every data-parallel replica's draws, on every rank (TP/PP ranks of a replica hold the same ones)."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        return draws
    parts: list[Any] = [None] * parallel_state.get_data_parallel_world_size()
    torch.distributed.all_gather_object(parts, draws, group=parallel_state.get_data_parallel_group())
    return [d for part in parts for d in part]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not is_rank0(), dynamic_ncols=True)


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg) -> None:
    run_stage(evaluate, cfg)


if __name__ == "__main__":
    main()
