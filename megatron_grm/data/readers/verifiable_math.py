"""Verifiable math examples: labels come from checking answers, not from human preference.

Two sources, both shipped inside pip packages (nothing is downloaded):

- ``champ-dataset`` (CHAMP, MIT): competition problems with reference answers and solutions written by
  GPT-3.5/4/4 Turbo/PaLM 2. A solution is judged *correct* when the reference integer appears in the
  model's own one-sentence summary of its answer, *incorrect* when the summary states other numbers but
  not the reference. Only integer answers that do not already appear in the problem text are used, so a
  restated number cannot pass for an answer. Pairs = (correct, incorrect) solutions of one problem.
- ``reasoning-gym`` generators (Apache-2.0): unlimited problems with a verifier (``score_answer``).
  Pairs = the reference solution vs. the same solution with its final answer corrupted; the verifier
  confirms the corrupted answer is wrong.

Pairs are generated, so the position of the correct response is drawn from the seed (label 0 or 1)
rather than always first. ``mode="single"`` gives single-response examples with 0/1 labels instead.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from megatron_grm.data.examples import Example, ExampleError, Turn
from megatron_grm.data.readers.common import OnError, ReadResult, RecordError, check_policy, handle_bad_record

Mode = Literal["pairs", "single"]

_NUMBER = re.compile(r"(?<![\d.,])-?\d{1,3}(?:,\d{3})+(?![\d,]\d)|(?<![\d.,])-?\d+(?!\.\d)")
_INTEGER_ANSWER = re.compile(r"-?\d+")
_NUMERIC_ANSWER = re.compile(r"-?\d+(?:\.\d+)?")
_SUMMARY_REQUEST = "Now, summarize the answer"


def integers_in(text: str) -> set[int]:
    """Integers written in ``text`` ("2,001,000" counts as one); decimals such as 3.5 are not integers."""
    return {int(m.group().replace(",", "")) for m in _NUMBER.finditer(text)}


def champ_verdict(summary: str, answer: int, problem_text: str) -> bool | None:
    """Correct (True) / incorrect (False) / undecidable (None) for one CHAMP solution's summary."""
    stated = integers_in(summary)
    if answer in stated:
        return True
    return False if stated - integers_in(problem_text) else None


def champ_dataset_path() -> Path:
    """Path of CHAMP's ``v0.json`` inside the installed ``champ-dataset`` package (found without importing
    it: the package imports dependencies we do not need)."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "champ-dataset is not installed: pip install --no-deps champ-dataset==1.0.0"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"


def read_champ(
    path: str | Path | None = None,
    *,
    mode: Mode = "pairs",
    max_pairs_per_problem: int = 4,
    seed: int = 0,
    on_error: OnError = "fail",
) -> ReadResult:
    """CHAMP solutions judged against the reference answer, as correct-vs-incorrect pairs (or singles)."""
    check_policy(on_error)
    if mode not in ("pairs", "single"):
        raise ValueError(f"mode must be 'pairs' or 'single', got {mode!r}")
    path = Path(path) if path is not None else champ_dataset_path()
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RecordError(path, f"not a CHAMP dataset file: {exc}") from None
    result = ReadResult()
    for problem_id in sorted(problems):
        try:
            judged = _judge_problem(problems[problem_id], result)
        except ExampleError as exc:
            handle_bad_record(
                result, RecordError(path, exc.reason, record=problem_id, field_name=exc.field), on_error
            )
            continue
        if judged is None:
            continue
        context, category, solutions = judged
        if mode == "single":
            for key, text, ok in solutions:
                result.examples.append(
                    Example(
                        context,
                        (text,),
                        int(ok),
                        "champ",
                        f"champ/{problem_id}/{key}",
                        category=category,
                        metadata={"solution": key},
                    )
                )
            continue
        correct = [(k, t) for k, t, ok in solutions if ok]
        wrong = [(k, t) for k, t, ok in solutions if not ok]
        if not correct or not wrong:
            result.excluded["problem without both correct and incorrect solutions"] += 1
            continue
        rng = random.Random(f"{seed}:{problem_id}")
        combos = [(c, w) for c in correct for w in wrong]
        rng.shuffle(combos)
        if len(combos) > max_pairs_per_problem:
            result.excluded["pairs beyond max_pairs_per_problem"] += len(combos) - max_pairs_per_problem
        for (ck, ct), (wk, wt) in combos[:max_pairs_per_problem]:
            result.examples.append(
                _pair(
                    context,
                    ct,
                    wt,
                    rng,
                    "champ",
                    f"champ/{problem_id}/{ck}|vs|{wk}",
                    category,
                    {"correct": ck, "incorrect": wk},
                )
            )
    return result


def _judge_problem(
    problem: Any, result: ReadResult
) -> tuple[tuple[Turn, ...], str, list[tuple[str, str, bool]]] | None:
    """Judge every usable solution of one problem. Exclusions are counted only once the whole problem
    has been read, so a malformed problem is reported as one bad record and nothing else."""
    if not isinstance(problem, dict):
        raise ExampleError("<record>", "must be an object")
    for name in ("_text", "_answer", "conversations", "category"):
        if name not in problem:
            raise ExampleError(name, "missing")
    conversations, text = problem["conversations"], problem["_text"]
    if not isinstance(conversations, dict):
        raise ExampleError("conversations", "must be an object")
    if not isinstance(text, str):
        raise ExampleError("_text", "must be a string")
    answer_text = str(problem["_answer"]).strip()
    if not _INTEGER_ANSWER.fullmatch(answer_text):
        result.excluded["non-integer reference answer"] += 1
        return None
    answer = int(answer_text)
    if answer in integers_in(text):
        result.excluded["reference answer appears in the problem text"] += 1
        return None
    excluded: Counter[str] = Counter()
    solutions: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    for key in sorted(conversations):
        if "Soln" in key:  # the prompt gave part of the reference solution; not a standalone answer
            excluded["solution continues a given partial solution"] += 1
            continue
        where = f"conversations[{key}].messages"
        messages = conversations[key].get("messages") if isinstance(conversations[key], dict) else None
        if not isinstance(messages, list) or len(messages) < 3:
            raise ExampleError(where, "must list the solution and its summary")
        if not all(isinstance(m, dict) for m in messages):
            raise ExampleError(where, "every message must be an object")
        if any(m.get("error") for m in messages):
            excluded["generation error"] += 1
            continue
        solution, request, summary = messages[-3], messages[-2], messages[-1]
        is_model = str(solution.get("role", "")).startswith("Model")
        if not is_model or not str(request.get("text", "")).startswith(_SUMMARY_REQUEST):
            raise ExampleError(where, "must end with the solution, the summary request and the summary")
        verdict = champ_verdict(str(summary.get("text", "")), answer, text)
        if verdict is None:
            excluded["summary states no number"] += 1
            continue
        solution_text = str(solution.get("text", "")).strip()
        if not solution_text or solution_text in seen:
            excluded["empty or duplicate solution"] += 1
            continue
        seen.add(solution_text)
        solutions.append((key, solution_text, verdict))
    result.excluded.update(excluded)
    return (Turn("user", text),), f"champ/{problem['category']}", solutions


def _pair(
    context: tuple[Turn, ...],
    correct: str,
    wrong: str,
    rng: random.Random,
    source: str,
    example_id: str,
    category: str,
    metadata: dict[str, Any],
) -> Example:
    label = rng.randrange(2)
    responses = (correct, wrong) if label == 0 else (wrong, correct)
    return Example(
        context,
        responses,
        label,
        source,
        example_id,
        ranking=(label, 1 - label),
        category=category,
        metadata=metadata,
    )


def corrupt_answer(answer: int | Decimal, rng: random.Random) -> int | Decimal:
    """A nearby wrong answer (off by 1-3, or ~10% for large answers), non-negative if the answer is.

    A decimal answer keeps its decimal places (1687.5 -> 1690.5), so the format gives nothing away.
    """
    spread = max(3, int(abs(answer)) // 10)
    while True:
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, spread)
        if wrong != answer and (answer < 0 or wrong >= 0):
            return wrong


def replace_final_answer(solution: str, answer: int | str, wrong: int | str) -> str:
    """The solution with its final answer changed: every whole-number occurrence of ``answer`` in the
    last two non-empty lines (the conclusion and a ``#### answer`` line) becomes ``wrong``."""
    lines = solution.rstrip().split("\n")
    # "69" also matches "69.0" (some generators print integers as floats); the ".0" is kept.
    pattern = re.compile(rf"(?<![\d.]){re.escape(str(answer))}(\.0+)?(?![\d]|\.\d)")
    changed = 0
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip():
            lines[i] = pattern.sub(lambda m: f"{wrong}{m.group(1) or ''}", lines[i])
            changed += 1
            if changed == 2:
                break
    return "\n".join(lines)


def read_reasoning_gym(
    dataset: str = "gsm_symbolic",
    *,
    size: int = 100,
    seed: int = 0,
    mode: Mode = "pairs",
    on_error: OnError = "fail",
) -> ReadResult:
    """Correct vs. corrupted answers to problems from a ``reasoning-gym`` generator (numeric answers only).

    The correct response is the generator's worked solution (``answer_cot``) when it has one, else a
    one-line answer; the corrupted one changes the final answer, and the generator's verifier must
    score it below 1. ``mode="single"`` yields one example per problem, correct or corrupted at random.
    """
    import reasoning_gym  # an optional dependency, imported only when this source is used

    check_policy(on_error)
    if mode not in ("pairs", "single"):
        raise ValueError(f"mode must be 'pairs' or 'single', got {mode!r}")
    generator = reasoning_gym.create_dataset(dataset, size=size, seed=seed)
    where = f"reasoning_gym:{dataset}(seed={seed})"
    result = ReadResult()
    for index in range(size):
        entry = generator[index]
        rng = random.Random(f"{seed}:{dataset}:{index}")
        try:
            correct, wrong = _gym_responses(generator, entry)
        except ExampleError as exc:
            handle_bad_record(
                result, RecordError(where, exc.reason, record=index, field_name=exc.field), on_error
            )
            continue
        context = (Turn("user", entry["question"]),)
        example_id, category = f"reasoning_gym/{dataset}/{seed}/{index}", f"reasoning_gym/{dataset}"
        source = f"reasoning_gym/{dataset}"
        if mode == "single":
            label = rng.randrange(2)
            result.examples.append(
                Example(context, (correct if label else wrong,), label, source, example_id, category=category)
            )
        else:
            result.examples.append(_pair(context, correct, wrong, rng, source, example_id, category, {}))
    return result


def _gym_responses(generator: Any, entry: dict[str, Any]) -> tuple[str, str]:
    answer_text = str(entry.get("answer", "")).strip()
    if not _NUMERIC_ANSWER.fullmatch(answer_text):
        raise ExampleError("answer", f"only numeric answers can be corrupted, got {answer_text[:40]!r}")
    answer = int(answer_text) if _INTEGER_ANSWER.fullmatch(answer_text) else Decimal(answer_text)
    wrong = corrupt_answer(answer, random.Random(f"corrupt:{entry['question']}"))
    cot = entry.get("metadata", {}).get("answer_cot")
    if isinstance(cot, str) and cot.strip():
        correct_text = cot.strip()
        wrong_text = replace_final_answer(correct_text, answer, wrong)
        if wrong_text == correct_text:
            raise ExampleError(
                "metadata.answer_cot", "the final answer does not appear in the solution's last lines"
            )
    else:
        correct_text, wrong_text = f"The answer is {answer}.", f"The answer is {wrong}."
    if generator.score_answer(answer_text, entry) < 1.0:
        raise ExampleError("answer", "the generator's verifier rejects its own answer")
    if generator.score_answer(str(wrong), entry) >= 1.0:
        raise ExampleError("answer", f"the verifier accepts the corrupted answer {wrong}")
    return correct_text, wrong_text
