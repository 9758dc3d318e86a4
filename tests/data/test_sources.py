"""One data spec names a stage's examples; a list of specs reads them all, with ids unique across them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from megatron_grm.data.sources import load_examples


def _jsonl(path: Path, ids: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": i, "context": f"q {i}", "responses": ["a", "b"], "label": 0}) + "\n"
                            for i in ids))
    return str(path)


def test_a_list_of_specs_reads_every_source_in_order(tmp_path: Path):
    first = _jsonl(tmp_path / "a.jsonl", ["x", "y"])
    examples = load_examples([first, "arithmetic:train:3"])
    assert [e.id for e in examples][:2] == ["x", "y"] and len(examples) == 5
    assert examples[2:] == load_examples("arithmetic:train:3")


def test_an_id_in_two_files_is_named_by_both_lines_or_skipped_and_logged(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    first, second = _jsonl(tmp_path / "a.jsonl", ["x", "y"]), _jsonl(tmp_path / "b.jsonl", ["z", "y"])
    with pytest.raises(ValueError, match=f"{second}:2: field 'id': duplicate id 'y': duplicate of {first}:2"):
        load_examples([first, second])
    with caplog.at_level(logging.WARNING):
        examples = load_examples([first, second], on_error="skip")
    assert [e.id for e in examples] == ["x", "y", "z"]
    assert f"{second}:2: field 'id': duplicate id 'y': duplicate of {first}:2" in caplog.text
    assert f"{second}: 1 examples, 1 bad records skipped" in caplog.text


def test_an_id_a_file_shares_with_a_generated_source_is_named_with_both_sources(tmp_path: Path):
    generated = load_examples("arithmetic:train:2")[1].id
    file = _jsonl(tmp_path / "a.jsonl", [generated])
    with pytest.raises(ValueError, match=f"arithmetic:train:2: example id '{generated}' is also in {file}"):
        load_examples([file, "arithmetic:train:2"])


@pytest.mark.parametrize("spec", [[], [3], {"path": "a.jsonl"}])
def test_a_spec_that_is_not_a_string_or_list_of_strings_is_an_error(spec):
    with pytest.raises(ValueError, match="expected a string or a non-empty list of strings"):
        load_examples(spec)


def test_a_source_that_gives_no_examples_is_an_error_that_says_why(tmp_path: Path):
    """An empty data.heldout file used to give 0 examples, and RFT then skipped its held-out check silently."""
    empty = tmp_path / "heldout.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"data spec '{empty}' gives no examples$"):
        load_examples(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "q"}\n')
    with pytest.raises(ValueError, match=f"data spec '{bad}' gives no examples; 1 bad record\\(s\\) skipped"):
        load_examples(str(bad), on_error="skip")


def test_what_a_reader_leaves_out_by_design_is_logged(caplog: pytest.LogCaptureFixture):
    """ReadResult.excluded (e.g. CHAMP problems whose answer is not an integer) was counted, never shown."""
    from megatron_grm.data.sources import read_examples

    with caplog.at_level(logging.INFO, logger="megatron_grm.data.sources"):
        result = read_examples("champ", on_error="skip")
    assert result.excluded["non-integer reference answer"] > 0
    assert f"champ: {len(result.examples)} examples; left out by design: " in caplog.text
    for reason, n in result.excluded.items():
        assert f"{reason}: {n}" in caplog.text


def _no_ids(path: Path, count: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"context": f"q {i}", "responses": ["a", "b"], "label": 0}) + "\n"
                            for i in range(count)))
    return str(path)


def test_same_named_files_without_ids_get_default_ids_told_apart_by_their_folders(tmp_path: Path):
    """Two ``train.jsonl`` files without ids in one list used to give ``train:1`` twice: a duplicate id."""
    a, b = _no_ids(tmp_path / "a" / "train.jsonl", 2), _no_ids(tmp_path / "b" / "train.jsonl", 1)
    other = _no_ids(tmp_path / "a" / "heldout.jsonl", 1)
    examples = load_examples([a, "arithmetic:train:1", b, other])
    assert [e.id for e in examples if not e.id.startswith("arith")] == ["a/train:1", "a/train:2", "b/train:1",
                                                                         "heldout:1"]
    assert {e.source for e in examples if "train:" in e.id} == {"train"}  # the source stays the stem
    assert [e.id for e in load_examples(a)] == ["train:1", "train:2"]  # alone: the stem, as before
    deeper = [_no_ids(tmp_path / "x" / "data" / "prefs.jsonl", 1), _no_ids(tmp_path / "y" / "data" / "prefs.jsonl", 1)]
    assert [e.id for e in load_examples(deeper)] == ["x/data/prefs:1", "y/data/prefs:1"]
    suffixes = [_no_ids(tmp_path / "s" / "prefs.jsonl", 1), _no_ids(tmp_path / "s" / "prefs.json", 1)]
    assert [e.id for e in load_examples(suffixes)] == ["prefs.jsonl:1", "prefs.json:1"]


def test_a_file_named_twice_in_one_list_still_repeats_its_ids(tmp_path: Path):
    a = _no_ids(tmp_path / "a" / "train.jsonl", 1)
    with pytest.raises(ValueError, match="duplicate id 'train:1'"):
        load_examples([a, str(tmp_path / "a" / ".." / "a" / "train.jsonl")])
