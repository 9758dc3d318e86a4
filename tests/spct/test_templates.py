"""Prompt templates: the paper's structure, hints, MetaRM and baseline prompts, chat templating."""

import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_grm.data import Example, Turn
from megatron_grm.spct import (
    GENERAL_CRITERIA,
    apply_chat_template,
    build_prompt,
    grm_prompt,
    hint_suffix,
    judge_baseline_prompt,
    metarm_prompt,
    parse_best_choice,
    parse_judgment,
    render_judgment,
    single_response_prompt,
)

REPO = Path(__file__).resolve().parents[2]
CONTEXT = (
    Turn("system", "Be concise."),
    Turn("user", "Name a prime."),
    Turn("assistant", "2."),
    Turn("user", "Another one?"),
)
RESPONSES = ("3 is prime.", "4 is prime.", "Seven.")


def test_default_prompt_has_the_papers_sections_in_order():
    prompt = grm_prompt(CONTEXT, RESPONSES)
    for name, _ in GENERAL_CRITERIA:
        assert name in prompt
    for anchor in ("1 = ", "6 = ", "10 = "):
        assert anchor in prompt
    positions = [
        prompt.index("#### General Criteria ####"),
        prompt.index("#### Conversation Context ####"),
        prompt.index("#### Responses to Score ####"),
        prompt.index("#### Output Format ####"),
    ]
    assert positions == sorted(positions)
    assert prompt.index("System: Be concise.") < prompt.index("User: Another one?")
    assert "\\boxed{x, x, x} for 3 responses" in prompt
    for label in ("Specific Criteria:", "Analysis:", "Scores:"):
        assert label in prompt


def test_responses_are_wrapped_in_begin_and_end_markers_in_order():
    prompt = grm_prompt(CONTEXT, RESPONSES)
    for i, response in enumerate(RESPONSES, 1):
        block = f"[The Begin of Response {i}]\n{response}\n[The End of Response {i}]"
        assert block in prompt
    assert prompt.index("[The Begin of Response 1]") < prompt.index("[The Begin of Response 3]")


def test_single_response_template_asks_for_zero_or_one():
    prompt = single_response_prompt(CONTEXT, "3 is prime.")
    assert "[The Begin of Response 1]\n3 is prime.\n[The End of Response 1]" in prompt
    assert "\\boxed{x}" in prompt and "0 or 1" in prompt
    assert "Response 2" not in prompt


def test_build_prompt_dispatches_on_n_and_appends_the_hint():
    pair = Example(CONTEXT, RESPONSES[:2], 1, "test", "p")
    single = Example(CONTEXT, RESPONSES[:1], 1, "test", "s")
    assert build_prompt(pair) == grm_prompt(CONTEXT, RESPONSES[:2])
    assert build_prompt(single) == single_response_prompt(CONTEXT, RESPONSES[0])
    hinted = build_prompt(pair, hint=True)
    assert hinted.startswith(build_prompt(pair))
    assert hinted.endswith("The best response is: Response 2")
    assert build_prompt(single, hint=True).endswith("The correct score is: 1")


def test_hint_suffix_names_the_best_response_one_based():
    assert hint_suffix(0, 3) == "The best response is: Response 1"
    with pytest.raises(ValueError):
        hint_suffix(3, 3)


def test_metarm_prompt_is_grm_prompt_plus_judgment_and_a_question():
    grm = grm_prompt(CONTEXT, RESPONSES)
    judgment = render_judgment("Correctness.", "Response 1 is right.", [9, 2, 5])
    prompt = metarm_prompt(grm, judgment)
    assert prompt.startswith(grm)
    assert judgment in prompt
    assert prompt.index(judgment) < prompt.index("Is the judgment above correct?")


def test_judge_baseline_prompt_asks_for_the_best_index():
    prompt = judge_baseline_prompt(CONTEXT, RESPONSES)
    assert "[The Begin of Response 3]\nSeven.\n[The End of Response 3]" in prompt
    assert "Specific Criteria" not in prompt
    assert parse_best_choice("Analysis: 3 is prime.\nBest: \\boxed{1}", len(RESPONSES)) == 0


def test_compact_variant_is_short_and_keeps_the_output_contract():
    prompt = grm_prompt((Turn("user", "What is 23+24?"),), ("47", "46"), variant="compact")
    assert len(prompt) <= 200
    assert "<1> 47 </1>\n<2> 46 </2>" in prompt and prompt.endswith("score each 1-10: \\boxed{x, x}\n")
    judgment = render_judgment("exact sum.", "23+24 = 47.", [8, 3])
    assert parse_judgment(judgment, 2).scores == [8, 3]


def test_unknown_variant_and_wrong_n_are_errors():
    with pytest.raises(ValueError):
        grm_prompt(CONTEXT, RESPONSES, variant="fancy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        grm_prompt(CONTEXT, RESPONSES[:1])
    with pytest.raises(ValueError):
        judge_baseline_prompt(CONTEXT, RESPONSES[:1])


def _real_hf_tokenizer(chat_template):
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_apply_chat_template_uses_the_tokenizers_template():
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompt = grm_prompt(CONTEXT, RESPONSES)
    assert (
        apply_chat_template(prompt, _real_hf_tokenizer(template)) == f"<|user|>{prompt}<|end|><|assistant|>"
    )


def test_apply_chat_template_falls_back_to_the_raw_prompt():
    assert apply_chat_template("p") == "p"
    assert apply_chat_template("p", _real_hf_tokenizer(None)) == "p"  # a base model has no chat template
    assert apply_chat_template("p", object()) == "p"  # e.g. a character tokenizer


def test_the_method_package_imports_without_torch():
    # spct/ is pure functions (DESIGN: distributed plumbing never leaks into it); a fresh interpreter
    # proves that importing it and the data schema pulls in neither torch nor Megatron.
    code = (
        "import sys, megatron_grm.spct, megatron_grm.data.arithmetic, megatron_grm.data.readers.rmb, "
        "megatron_grm.data.readers.jsonl, megatron_grm.data.readers.verifiable_math; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
