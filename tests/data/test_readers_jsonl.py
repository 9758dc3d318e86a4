"""Our JSONL format: the documented examples parse, round trips are exact, bad lines name line and field."""

import json
import logging
import re
from pathlib import Path

import pytest

from megatron_grm.data import Example, Turn
from megatron_grm.data.readers.common import RecordError
from megatron_grm.data.readers.jsonl import read_jsonl, write_jsonl

DOC = Path(__file__).resolve().parents[2] / "docs" / "data_format.md"


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_documented_examples_parse(tmp_path):
    block = re.search(r"```jsonl\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL).group(1)
    result = read_jsonl(_write(tmp_path / "doc.jsonl", block.strip().splitlines()))
    assert [ex.id for ex in result.examples] == ["math-1", "chat-7", "single-3"]
    first, chat, single = result.examples
    assert first.context == (Turn("user", "What is 12*12?"),)
    assert first.source == "doc" and first.label == 0
    assert chat.best_index == 2 and chat.ranking == (2, 0, 1) and chat.preference_strength == 1.5
    assert chat.category == "Helpfulness/Chat" and chat.query == "Again, in French."
    assert (
        single.num_responses == 1 and single.best_index is None and single.metadata == {"note": "91 = 7 * 13"}
    )


def test_defaults_for_source_and_id(tmp_path):
    path = _write(
        tmp_path / "prefs.jsonl", ["", json.dumps({"context": "q", "responses": ["a", "b"], "label": 1})]
    )
    (ex,) = read_jsonl(path).examples
    assert ex.source == "prefs" and ex.id == "prefs:2"


def test_write_then_read_round_trips(tmp_path):
    examples = [
        Example(
            (Turn("user", "q1"),),
            ("a", "b", "c"),
            1,
            "s",
            "1",
            ranking=(1, 2, 0),
            preference_strength=2.0,
            category="x/y",
            metadata={"k": [1, 2]},
        ),
        Example((Turn("system", "sys"), Turn("user", "q2 ünïcödé")), ("only",), 1, "s", "2"),
    ]
    assert write_jsonl(examples, tmp_path / "out.jsonl") == 2
    back = read_jsonl(tmp_path / "out.jsonl").examples
    assert back == examples
    assert back[0].metadata == {"k": [1, 2]}


GOOD = json.dumps({"context": "q", "responses": ["a", "b"], "label": 0})


@pytest.mark.parametrize(
    ("bad_line", "field", "reason"),
    [
        ('{"context": "q", "responses": ["a", "b"], "label": 0', None, "invalid JSON"),
        ('["not", "an", "object"]', "<record>", "must be a JSON object"),
        ('{"context": "q", "responses": ["a", "b"]}', "label", "missing"),
        ('{"context": "q", "responses": ["a", "b"], "lable": 0, "label": 0}', "lable", "unknown field"),
        ('{"context": "q", "responses": ["a", "b"], "label": 2}', "label", "must be a response index"),
        ('{"context": "q", "responses": ["a", "b"], "label": true}', "label", "must be an integer"),
        ('{"context": "q", "responses": ["a"], "label": 3}', "label", "must be 0 or 1"),
        ('{"context": "q", "responses": [], "label": 0}', "responses", "at least one"),
        ('{"context": "q", "responses": ["a", 5], "label": 0}', "responses[1]", "must be a string"),
        ('{"context": [], "responses": ["a", "b"], "label": 0}', "context", "at least one turn"),
        (
            '{"context": [{"role": "bot", "content": "x"}], "responses": ["a"], "label": 0}',
            "context[0].role",
            "must be",
        ),
        ('{"context": [{"role": "user"}], "responses": ["a"], "label": 0}', "context[0].content", "missing"),
        (
            '{"context": [{"role": "assistant", "content": "x"}], "responses": ["a"], "label": 0}',
            "context",
            "last turn",
        ),
        (
            '{"context": "q", "responses": ["a", "b"], "label": 0, "ranking": [1, 0]}',
            "ranking",
            "must start with",
        ),
        (
            '{"context": "q", "responses": ["a", "b"], "label": 0, "ranking": [0, 0]}',
            "ranking",
            "permutation",
        ),
        (
            '{"context": "q", "responses": ["a", "b"], "label": 0, "preference_strength": -1}',
            "preference_strength",
            ">= 0",
        ),
    ],
)
def test_a_malformed_record_is_reported_with_its_line_number_and_field(tmp_path, bad_line, field, reason):
    path = _write(tmp_path / "data.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    error = info.value
    assert error.line == 3 and error.field == field and error.path == str(path)
    assert str(error).startswith(f"{path}:3: ")
    assert reason in str(error)
    if field is not None:
        assert f"field '{field}'" in str(error)


def test_skip_policy_counts_and_logs_bad_records(tmp_path, caplog):
    bad_label = '{"context": "q", "responses": ["a", "b"], "label": 5}'
    path = _write(tmp_path / "data.jsonl", [GOOD, "{oops", GOOD, bad_label, GOOD])
    with caplog.at_level(logging.WARNING):
        result = read_jsonl(path, on_error="skip")
    assert len(result.examples) == 3
    assert result.num_skipped == 2
    assert [e.line for e in result.errors] == [2, 4]
    assert "skipped 2 bad record(s)" in caplog.text and f"{path}:2" in caplog.text


def test_unknown_policy_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(_write(tmp_path / "d.jsonl", [GOOD]), on_error="ignore")  # type: ignore[arg-type]
