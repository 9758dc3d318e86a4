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
        ('{"id": null, "context": "q", "responses": ["a", "b"], "label": 0}', "id", "got null"),
        ('{"id": true, "context": "q", "responses": ["a", "b"], "label": 0}', "id", "got true"),
        ('{"id": {"a": 1}, "context": "q", "responses": ["a", "b"], "label": 0}', "id", "got dict"),
        ('{"id": 1.5, "context": "q", "responses": ["a", "b"], "label": 0}', "id", "got float"),
        ('{"context": "q", "responses": ["a", "b"], "label": 0, "label": 1}', "label", "appears twice"),
        ('{"context": [{"role": "user", "content": "q", "content": "r"}], "responses": ["a"], "label": 0}',
         "content", "appears twice"),
        ('{"context": [{"role": "user", "content": "q", "name": "bob"}], "responses": ["a"], "label": 0}',
         "context[0].name", "unknown field (allowed: role, content)"),
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


def _line(**fields):
    return json.dumps({"context": "q", "responses": ["a", "b"], "label": 0, **fields})


def test_integer_ids_become_their_decimal_string(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_line(id=7), _line(id="x")])
    assert [ex.id for ex in read_jsonl(path).examples] == ["7", "x"]


def test_a_line_of_invalid_utf8_is_one_bad_record_naming_its_line(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"context": "caf\xe9", "responses": ["a"], "label": 0}\n'
                     + GOOD.encode() + b"\n")
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    assert info.value.line == 2 and str(info.value).startswith(f"{path}:2: not valid UTF-8")
    with caplog.at_level(logging.WARNING):
        result = read_jsonl(path, on_error="skip")
    assert len(result.examples) == 2 and [e.line for e in result.errors] == [2]
    assert "skipped 1 bad record(s)" in caplog.text and "not valid UTF-8" in caplog.text


def test_a_byte_order_mark_at_the_start_of_the_file_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_line(id="first") + "\n" + _line(id="second") + "\n").encode())
    result = read_jsonl(path)
    assert [ex.id for ex in result.examples] == ["first", "second"] and result.errors == []


def test_a_repeated_id_is_a_bad_record_naming_the_first_line(tmp_path, caplog):
    path = _write(tmp_path / "d.jsonl", [_line(id="x"), _line(id="y"), _line(id="x"), _line(id=1), _line(id="1")])
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    assert info.value.line == 3 and info.value.field == "id"
    assert str(info.value) == f"{path}:3: field 'id': duplicate id 'x': duplicate of line 1"
    with caplog.at_level(logging.WARNING):
        result = read_jsonl(path, on_error="skip")
    assert [ex.id for ex in result.examples] == ["x", "y", "1"]
    assert [(e.line, e.field) for e in result.errors] == [(3, "id"), (5, "id")]
    assert "duplicate of line 4" in str(result.errors[1])  # the integer 1 and the string "1" are one id
    assert "skipped 2 bad record(s)" in caplog.text


def test_default_ids_of_same_named_files_collide_and_seen_ids_names_both_files(tmp_path):
    from megatron_grm.data.readers.common import SeenIds

    a = _write((tmp_path / "a").mkdir() or tmp_path / "a" / "train.jsonl", [GOOD])
    b = _write((tmp_path / "b").mkdir() or tmp_path / "b" / "train.jsonl", [GOOD, _line(id="own")])
    assert read_jsonl(a).examples[0].id == read_jsonl(b).examples[0].id == "train:1"
    seen = SeenIds()
    read_jsonl(a, seen_ids=seen)
    with pytest.raises(RecordError) as info:
        read_jsonl(b, seen_ids=seen)
    assert str(info.value) == f"{b}:1: field 'id': duplicate id 'train:1': duplicate of {a}:1"
    seen = SeenIds()
    read_jsonl(a, seen_ids=seen)
    assert [ex.id for ex in read_jsonl(b, on_error="skip", seen_ids=seen).examples] == ["own"]


def test_run_output_lines_name_the_line_of_a_bad_byte_or_a_repeated_key_and_accept_a_bom(tmp_path):
    """``json_object_lines`` (sample, judgment and outcome files) reads as the example readers do: a bad byte
    used to raise a bare UnicodeDecodeError, a repeated key kept its last value, and a BOM was invalid JSON."""
    from megatron_grm.data.readers.common import json_object_lines

    path = tmp_path / "run.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\n{"b": "\xc3\xa9"}\n')
    assert list(json_object_lines(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"b": "\u00e9"})]
    for data, message in [(b'{"a": 1}\n{"b": "\xff"}\n', r":2: not valid UTF-8: byte\(s\) b'\\xff'"),
                          (b'{"a": 1}\n{"a": 1, "a": 2}\n', r":2: field 'a': the key 'a' appears twice"),
                          (b'{"a": 1}\n\xef\xbb\xbf{"a": 1}\n', r":2: invalid JSON")]:  # a BOM only starts a file
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(str(path)) + message):
            list(json_object_lines(path))
