"""General instruction data for the SFT mix: one source or a weighted blend of several (data.instruction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_grm.data.tokenizer import CharTokenizer
from megatron_grm.stages.instruction_data import (
    InstructionData,
    instruction_sources,
    mix_with_instruction,
    read_instruction_data,
)


def _samples(tag: int, n: int) -> list:
    return [([tag, i], [0, 1]) for i in range(n)]


@pytest.mark.parametrize(("spec", "expected"), [
    ("a.jsonl", [("a.jsonl", 1.0)]),
    (["a.jsonl", "prep/b"], [("a.jsonl", 1.0), ("prep/b", 1.0)]),
    ([0.7, "a.jsonl", 0.3, "prep/b"], [("a.jsonl", 0.7), ("prep/b", 0.3)]),  # Megatron's --data-path form
    ([{"path": "a.jsonl", "weight": 2}, {"path": "prep/b"}], [("a.jsonl", 2.0), ("prep/b", 1.0)]),
])
def test_instruction_sources_accept_megatron_style_blends(spec, expected):
    assert instruction_sources(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ([0.7, "a.jsonl", "prep/b"], "expected a source"),
    ([-1, "a.jsonl", 2, "b"], "weight of a.jsonl must be a non-negative number"),
    ([0, "a.jsonl", 0, "b"], "must not all be 0"),
    ([{"path": "a.jsonl", "wieght": 2}], r"data.instruction\[0\]: expected \{path, weight\}"),
    ([], "expected a source"),
    ([1, "a.jsonl", 2, "a.jsonl"], "a.jsonl listed more than once"),
])
def test_a_malformed_instruction_blend_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        instruction_sources(spec)


def test_sources_share_the_instruction_part_by_weight_and_the_draw_is_fixed():
    judgments = _samples(9, 100)
    blend = InstructionData(["a", "b", "c"], [_samples(0, 50), _samples(1, 500), _samples(2, 5)], [0.5, 0.3, 0.2])
    mix, counts = mix_with_instruction(judgments, blend, ratio=0.8, seed=3)
    assert counts == {"a": 200, "b": 120, "c": 80} and len(mix) == 100 + 400
    assert mix[:100] == judgments
    drawn = [ids[0] for ids, _ in mix[100:]]
    assert [drawn.count(tag) for tag in (0, 1, 2)] == [200, 120, 80]
    c = [tuple(ids) for ids, _ in mix[100:] if ids[0] == 2]
    assert all(c.count(s) == 16 for s in set(c)) and len(set(c)) == 5  # a small source repeats whole
    assert mix_with_instruction(judgments, blend, ratio=0.8, seed=3)[0] == mix
    assert mix_with_instruction(judgments, blend, ratio=0.8, seed=4)[0] != mix


def test_one_source_draws_as_before_blends_existed():
    """A single source keeps the draw earlier runs made (permutations seeded by [seed, 17]), so resumed
    and repeated runs of existing configs train on the same mix."""
    judgments, pool = _samples(9, 30), _samples(0, 20)
    mix, counts = mix_with_instruction(judgments, InstructionData(["a"], [pool], [1.0]), ratio=0.5, seed=7)
    rng = np.random.default_rng([7, 17])
    picks = rng.permutation(20).tolist() + rng.permutation(20)[:10].tolist()
    assert counts == {"a": 30} and mix == judgments + [pool[i] for i in picks]


@pytest.mark.parametrize("stage", ["rft", "bootstrap"])
def test_a_ratio_without_instruction_data_names_the_stage_that_set_it(stage):
    with pytest.raises(ValueError, match=rf"^{stage}\.instruction_ratio=0\.3 needs instruction data: .*"
                                         rf"conf/{stage}\.yaml\), or set {stage}\.instruction_ratio=0$"):
        mix_with_instruction(_samples(9, 10), InstructionData(), ratio=0.3, seed=0, stage=stage)
    assert mix_with_instruction(_samples(9, 10), InstructionData(), ratio=0.0, seed=0, stage=stage)[1] == {}


def test_read_instruction_data_reads_every_source_and_names_an_empty_one(tmp_path: Path):
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text("".join(json.dumps({"prompt": f"Q{i}", "response": "A"}) + "\n" for i in range(3)))
    long.write_text(json.dumps({"prompt": "Q" * 80, "response": "A" * 80}) + "\n")
    tokenizer = CharTokenizer()
    data = read_instruction_data([2, str(short), 1, "digit_facts:10"], tokenizer, seq_length=64)
    assert data.names == [str(short), "digit_facts:10"] and data.weights == [2.0, 1.0]
    assert [len(s) for s in data.samples] == [3, 10]
    with pytest.raises(ValueError, match=f"{long} has no sample that fits trainer.seq_length=64 but weight 1.0"):
        read_instruction_data([str(short), str(long)], tokenizer, seq_length=64, bad_records="skip")
    assert read_instruction_data(None, tokenizer, seq_length=64).samples == []


def test_a_blend_on_the_command_line_reaches_the_stage_as_megatron_writes_it():
    from megatron_grm.stages.common import load_config

    config = load_config("rft", ["data.instruction=[0.7,chat.jsonl,0.3,prep/code]"])
    assert instruction_sources(config["data"]["instruction"]) == [("chat.jsonl", 0.7), ("prep/code", 0.3)]
