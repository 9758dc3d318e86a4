"""Prompt templates for the pointwise GRM (paper §2.1, Appendix prompt templates), in our own wording.

The default template follows the paper's structure: a role, instructions to write weighted specific
criteria ("principles") and then an analysis ("critique") before scoring every response 1-10 with
anchors, the four general criteria, and sections for the context, the responses (each wrapped
``[The Begin of Response i] ... [The End of Response i]``) and the output format that
:func:`megatron_grm.spct.judgment.parse_judgment` reads back. Alongside it: the single-response 0/1
template, the MetaRM template (GRM prompt + a judgment, paper §4.2), the LLM-as-a-judge baseline and
the hint used by hinted rejective sampling (paper §3.2). ``variant="compact"`` is a short form for the
CPU demo, whose tiny model has a small context (see notes/cpu-miniature.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from megatron_grm.data.examples import Example, Turn

Variant = Literal["default", "compact"]
VARIANTS: tuple[str, ...] = ("default", "compact")

GENERAL_CRITERIA: tuple[tuple[str, str], ...] = (
    ("Instruction Adherence", "the response does what the query asks, respecting every stated constraint."),
    ("Usefulness", "the response actually solves the user's problem or meets the user's need."),
    ("Level of Detail", "the response is complete and specific where it matters, without padding."),
    ("Relevance", "the response stays on the query and is consistent with the conversation so far."),
)

_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_context(context: Sequence[Turn]) -> str:
    """The conversation as ``Role: content`` blocks; the last block is the user's query."""
    return "\n\n".join(f"{_ROLE_NAMES[t.role]}: {t.content}" for t in context)


def _wrap_responses(responses: Sequence[str]) -> str:
    return "\n".join(
        f"[The Begin of Response {i}]\n{r}\n[The End of Response {i}]" for i, r in enumerate(responses, 1)
    )


def _boxed_placeholder(n: int) -> str:
    return "\\boxed{" + ", ".join(["x"] * n) + "}"


def _criteria_block() -> str:
    return "\n".join(f"{i}. {name}: {text}" for i, (name, text) in enumerate(GENERAL_CRITERIA, 1))


def hint_suffix(label: int, num_responses: int = 2) -> str:
    """The hint appended for hinted rejective sampling (paper §3.2): names the labelled best response.

    For a single response (n = 1) it states the expected 0/1 verdict instead.
    """
    if num_responses >= 2:
        if not 0 <= label < num_responses:
            raise ValueError(f"best index {label} out of range for {num_responses} responses")
        return f"The best response is: Response {label + 1}"
    if label not in (0, 1):
        raise ValueError(f"single-response label must be 0 or 1, got {label}")
    return f"The correct score is: {label}"


def grm_prompt(
    context: Sequence[Turn],
    responses: Sequence[str],
    *,
    variant: Variant = "default",
    hint: int | None = None,
) -> str:
    """The multi-response GRM prompt (n >= 2): principles, then critique, then one 1-10 score each."""
    n = len(responses)
    if n < 2:
        raise ValueError(f"grm_prompt needs n >= 2 responses, got {n}; use single_response_prompt")
    if variant == "compact":
        prompt = _compact_prompt(context, responses, "score each 1-10", _boxed_placeholder(n))
    elif variant == "default":
        prompt = (
            "You are an expert judge of AI assistant responses; judge strictly and fairly.\n\n"
            f"You are given a conversation (its final turn is the user's query) and {n} candidate "
            "responses to that query. Starting from the general criteria below, first write the specific "
            "criteria that matter for this query, each with a weight (the weights sum to 100%). Then "
            "analyse every response against those criteria step by step, comparing them where it helps. "
            "Finally give every response one overall score.\n\n"
            "Each score is an integer from 1 to 10; a higher score means the response meets the criteria "
            "more fully. Anchors: 1 = meets none of the criteria, 6 = meets only part of them, "
            "10 = meets all of them perfectly. Be as strict as you can.\n\n"
            f"#### General Criteria ####\n{_criteria_block()}\n\n"
            f"#### Conversation Context ####\n{render_context(context)}\n\n"
            f"#### Responses to Score ####\n{_wrap_responses(responses)}\n\n"
            "#### Output Format ####\n"
            "Write exactly three parts:\n"
            "Specific Criteria: <the criteria specific to this query and context, with their weights>\n"
            "Analysis: <your step-by-step analysis of each response against the criteria>\n"
            "Scores: <the overall score of every response, in order, separated by commas inside "
            f"\\boxed{{}}, e.g. {_boxed_placeholder(n)} for {n} responses>"
        )
    else:
        raise ValueError(f"unknown template variant {variant!r}; choose from {VARIANTS}")
    return prompt if hint is None else _append_hint(prompt, hint_suffix(hint, n), variant)


def single_response_prompt(
    context: Sequence[Turn], response: str, *, variant: Variant = "default", hint: int | None = None
) -> str:
    """The single-response template (n = 1): the score is 1 if the response is correct, else 0 (Eq. 10)."""
    if variant == "compact":
        prompt = _compact_prompt(context, [response], "score 1 if right, 0 if wrong", _boxed_placeholder(1))
    elif variant == "default":
        prompt = (
            "You are an expert judge of AI assistant responses; judge strictly and fairly.\n\n"
            "You are given a conversation (its final turn is the user's query) and one candidate response "
            "to that query. Starting from the general criteria below, first write the specific criteria "
            "that matter for this query, each with a weight (the weights sum to 100%). Then analyse the "
            "response against those criteria step by step, checking every claim it makes. Finally decide "
            "whether the response is acceptable.\n\n"
            "The score is 1 if the response is correct and meets the criteria, and 0 if it contains an "
            "error or fails the criteria. Be as strict as you can.\n\n"
            f"#### General Criteria ####\n{_criteria_block()}\n\n"
            f"#### Conversation Context ####\n{render_context(context)}\n\n"
            f"#### Response to Score ####\n{_wrap_responses([response])}\n\n"
            "#### Output Format ####\n"
            "Write exactly three parts:\n"
            "Specific Criteria: <the criteria specific to this query and context, with their weights>\n"
            "Analysis: <your step-by-step analysis of the response against the criteria>\n"
            "Scores: <0 or 1 inside \\boxed{}, e.g. \\boxed{x}>"
        )
    else:
        raise ValueError(f"unknown template variant {variant!r}; choose from {VARIANTS}")
    return prompt if hint is None else _append_hint(prompt, hint_suffix(hint, 1), variant)


def _compact_prompt(context: Sequence[Turn], responses: Sequence[str], task: str, boxed: str) -> str:
    # The query, the responses and the output contract, nothing else: every character is a token of the
    # demo's character-level model (prompt + judgment ~200 tokens, 1.5x fewer than a worded form).
    blocks = "\n".join(f"<{i}> {r} </{i}>" for i, r in enumerate(responses, 1))
    ctx = context[-1].content if len(context) == 1 else render_context(context)
    return f"{ctx}\n{blocks}\nJudge, {task}: {boxed}\n"


def _append_hint(prompt: str, hint: str, variant: str) -> str:
    return f"{prompt}{hint}\n" if variant == "compact" else f"{prompt}\n\n{hint}"


def build_prompt(example: Example, *, variant: Variant = "default", hint: bool = False) -> str:
    """The GRM prompt for an example: the multi-response template for n >= 2, the 0/1 one for n = 1.

    ``hint=True`` appends :func:`hint_suffix` for the example's label (hinted sampling, paper §3.2).
    """
    label = example.label if hint else None
    if example.num_responses == 1:
        return single_response_prompt(example.context, example.responses[0], variant=variant, hint=label)
    return grm_prompt(example.context, example.responses, variant=variant, hint=label)


def metarm_prompt(grm_prompt_text: str, judgment: str) -> str:
    """The MetaRM input (paper §4.2): the GRM prompt, one sampled judgment, and the question whether it
    is correct. The MetaRM's scalar head reads this text; its target is Eq. 10 on the judgment."""
    return (
        f"{grm_prompt_text}\n\n"
        f"#### Judgment to Verify ####\n{judgment}\n\n"
        "#### Question ####\n"
        "Is the judgment above correct? A correct judgment gives the truly best response a score strictly "
        "higher than every other response (for a single response: the right 0/1 verdict)."
    )


def judge_baseline_prompt(context: Sequence[Turn], responses: Sequence[str]) -> str:
    """The LLM-as-a-judge baseline (paper §5, baselines): no principles and no pointwise scores, just a
    short comparison and the number of the best response, read by ``parse_best_choice``."""
    n = len(responses)
    if n < 2:
        raise ValueError(f"the judge baseline compares n >= 2 responses, got {n}")
    return (
        "You are an expert judge of AI assistant responses.\n\n"
        f"Compare the {n} candidate responses to the user's query in the conversation below for "
        "helpfulness, correctness, harmlessness and relevance, and decide which one is best. Do not let "
        "the order or the length of the responses influence you.\n\n"
        f"#### Conversation Context ####\n{render_context(context)}\n\n"
        f"#### Responses to Compare ####\n{_wrap_responses(responses)}\n\n"
        "#### Output Format ####\n"
        "Analysis: <a short comparison>\n"
        f"Best: <the number of the best response inside \\boxed{{}}, e.g. \\boxed{{1}}, from 1 to {n}>"
    )


def apply_chat_template(prompt: str, tokenizer: Any = None) -> str:
    """Wrap the prompt as one user turn with the tokenizer's chat template, ready for generation.

    ``tokenizer`` is any Hugging Face-style object with ``apply_chat_template``. Without one (or when it
    has no chat template, e.g. a base model or the demo's character tokenizer) the raw prompt is used.
    This is text for people: encoded by the library, a special token's string inside a judged response
    becomes that control token. Token ids for the model come from ``Tokenizer.encode_prompt(prompt,
    literal=True)`` (``megatron_grm.data.tokenizer``), which reads the responses as text.
    """
    render = getattr(tokenizer, "apply_chat_template", None)
    if tokenizer is None or not callable(render):
        return prompt
    if hasattr(tokenizer, "chat_template") and tokenizer.chat_template is None:
        return prompt
    return render([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
