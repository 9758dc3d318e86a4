"""Preprocessing reads back token for token, resumes without duplicates, and reports bad records."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_grm.data.preprocess import (
    PreprocessConfig,
    PreprocessedDataset,
    RecordError,
    encode_record,
    parse_record,
    preprocess,
)
from megatron_grm.data.tokenizer import CharTokenizer, load_tokenizer

# (line text, expected field) for records that must be rejected
BAD_RECORDS = [
    ("{not json", "$"),
    (json.dumps(["a list"]), "$"),
    (json.dumps({"prompt": "q"}), "response"),
    (json.dumps({"prompt": "q", "response": "   "}), "response"),
    (json.dumps({"prompt": 3, "response": "a"}), "prompt"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}],
                 "response": "a"}), "prompt[1].role"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]}),
     "messages[1].role"),
    (json.dumps({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "caf\u00e9"}]}), "messages[1].content"),
    (json.dumps({"prompt": "q", "messages": []}), "$"),
    (json.dumps({"system": "Be brief.", "prompt": "q", "response": "a"}), "system"),
    (json.dumps({"messages": [{"role": "user", "content": "q", "name": "bob"},
                              {"role": "assistant", "content": "a"}]}), "messages[0].name"),
    (json.dumps({"prompt": [{"role": "user", "content": "q", "weight": 0}], "response": "a"}),
     "prompt[0].weight"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "response": "b"}), "response"),
    ('{"prompt": "q", "response": "a", "response": "b"}', "response"),  # JSON would keep "b" without a word
    (json.dumps({"prompt": "q", "response": "a", "chat": "false"}), "chat"),
]


def _good_record(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    kind = i % 3
    if kind == 0:
        return {"prompt": f"What is {a}+{b}?", "response": f"{a + b}"}
    if kind == 1:
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{a}*{b}?"}]
        return {"prompt": prompt, "response": f"It is {a * b}."}
    return {"messages": [{"role": "user", "content": f"Compare {a} and {b}"},
                         {"role": "assistant", "content": f"{max(a, b)} is larger" + "!" * (i % 7)}]}


def write_dataset(path: Path, n: int, seed: int = 0,
                  bad_every: int = 97) -> tuple[list[dict], dict[int, str]]:
    """n lines of JSONL; every ``bad_every``-th line is a bad record, plus a few blank lines.
    Returns the good records in order and {line number: expected reject field}."""
    rng = random.Random(seed)
    good, bad, lines = [], {}, []
    for i in range(n):
        if i % bad_every == bad_every - 1:
            text, field = BAD_RECORDS[(i // bad_every) % len(BAD_RECORDS)]
            bad[i + 1] = field
            lines.append(text)
        elif i % 500 == 250:
            lines.append("")
        else:
            record = _good_record(rng, i)
            good.append(record)
            lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return good, bad


def read_all(folder: Path) -> list[tuple[list[int], list[int]]]:
    ds = PreprocessedDataset(folder)
    return [(ds[i][0].tolist(), ds[i][1].tolist()) for i in range(len(ds))]


def test_preprocessed_dataset_reads_back_token_for_token(tmp_path: Path):
    good, bad = write_dataset(tmp_path / "a.jsonl", 3000)
    config = PreprocessConfig([tmp_path / "a.jsonl"], tmp_path / "out", "char", workers=2, chunk_size=400,
                              progress=False)
    report = preprocess(config)
    assert report.complete and report.chunks_total == 8 and report.chunks_run == 8
    tokenizer = CharTokenizer()
    expected = [tuple(a.tolist() for a in encode_record(r, tokenizer)) for r in good]
    assert read_all(tmp_path / "out") == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sources"][0]["sha256"] == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    assert manifest["counts"]["documents"] == len(good)
    assert manifest["counts"]["rejects"] == len(bad)
    assert manifest["counts"]["records"] == len(good) + len(bad)
    assert manifest["counts"]["tokens"] == sum(len(ids) for ids, _ in expected)
    assert manifest["counts"]["response_tokens"] == sum(sum(mask) for _, mask in expected)
    assert manifest["tokenizer"]["kind"] == "char" and manifest["layout"]["token_dtype"] == "uint16"
    assert not (tmp_path / "out" / "shards").exists()


def test_bad_records_are_counted_and_reported_with_file_line_and_field(tmp_path: Path):
    _, bad_b = write_dataset(tmp_path / "b.jsonl", 300, seed=1, bad_every=31)
    _, bad_a = write_dataset(tmp_path / "a.jsonl", 1000, bad_every=50)
    _, bad_c = write_dataset(tmp_path / "c.jsonl", 5, bad_every=1)  # a chunk with no good record at all
    config = PreprocessConfig([tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"],
                              tmp_path / "out", "char", workers=2, chunk_size=128, progress=False)
    report = preprocess(config)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    got = {(Path(r["file"]).name, r["line"]): r["field"] for r in rejects}
    want = {(name, line): field for name, bad in (("a.jsonl", bad_a), ("b.jsonl", bad_b), ("c.jsonl", bad_c))
            for line, field in bad.items()}
    assert len(bad_c) == 5
    assert got == want
    assert report.counts["rejects"] == len(want)
    assert sum(report.manifest["rejects_by_field"].values()) == len(want)
    assert all(r["reason"] and "text" in r for r in rejects)
    unicode_reject = next(r for r in rejects if r["field"] == "messages[1].content")
    assert "U+00E9" in unicode_reject["reason"]


def test_interrupted_run_resumes_without_duplicates(tmp_path: Path):
    good, _ = write_dataset(tmp_path / "a.jsonl", 2500)
    config = PreprocessConfig([tmp_path / "a.jsonl"], tmp_path / "out", "char", workers=2, chunk_size=300,
                              progress=False)
    first = preprocess(config, max_chunks=3)
    assert not first.complete and first.chunks_run == 3 and first.manifest is None
    assert not (tmp_path / "out" / "manifest.json").exists()
    shards = tmp_path / "out" / "shards"
    assert len(list(shards.glob("*.done.json"))) == 3
    # A worker killed mid-chunk leaves a half-written shard and no done marker.
    crashed = sorted(c["chunk"] for c in map(lambda p: json.loads(p.read_text()), shards.glob("*.done.json")))
    pending = f"f0000-c{len(crashed):06d}"
    (shards / f"{pending}.tokens.bin").write_bytes(b"\x01\x02garbage")
    (shards / f"{pending}.rejects.jsonl").write_text('{"stale": true}\n')

    resumed = preprocess(config)
    assert resumed.complete and resumed.chunks_done_before == 3
    assert resumed.chunks_run == resumed.chunks_total - 3
    once = preprocess(PreprocessConfig([tmp_path / "a.jsonl"], tmp_path / "once", "char", workers=1,
                                       chunk_size=300, progress=False))
    result = read_all(tmp_path / "out")
    assert result == read_all(tmp_path / "once")
    assert len(result) == len(good) == resumed.counts["documents"] == once.counts["documents"]
    assert "stale" not in (tmp_path / "out" / "rejects.jsonl").read_text()
    again = preprocess(config)  # a finished run is left alone
    assert again.complete and again.chunks_run == 0 and len(read_all(tmp_path / "out")) == len(good)


def test_resume_refuses_a_run_with_other_inputs(tmp_path: Path):
    write_dataset(tmp_path / "a.jsonl", 800)
    config = PreprocessConfig([tmp_path / "a.jsonl"], tmp_path / "out", "char", chunk_size=200,
                              progress=False)
    preprocess(config, max_chunks=1)
    good, _ = write_dataset(tmp_path / "a.jsonl", 800, seed=5)
    with pytest.raises(ValueError, match="other inputs, tokenizer or settings"):
        preprocess(config)
    config.overwrite = True
    assert preprocess(config).counts["documents"] == len(good)


def test_hf_preprocessing_masks_exactly_the_response(tmp_path: Path, smollm2_tokenizer_dir: Path):
    tokenizer = load_tokenizer(smollm2_tokenizer_dir)
    records = [{"prompt": f"Question {i}: what is {i}*3?", "response": f"{3 * i}, since {i}·3 = {3 * i}."}
               for i in range(200)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = preprocess(PreprocessConfig([tmp_path / "r.jsonl"], tmp_path / "out", smollm2_tokenizer_dir,
                                         workers=2, chunk_size=50, progress=False))
    assert report.counts["documents"] == 200 and report.manifest["tokenizer"]["kind"] == "hf"
    for record, (ids, mask) in zip(records, read_all(tmp_path / "out")):
        response = [i for i, m in zip(ids, mask) if m]
        assert tokenizer.decode(response) == record["response"] + "<|im_end|>"  # the turn ends at EOS
        assert tokenizer.decode(ids[: mask.index(1)]).endswith("<|im_start|>assistant\n")


def test_a_records_own_chat_flag_is_honoured_as_the_jsonl_sft_reader_honours_it():
    """docs/data_format.md: a JSONL and a preprocessed folder accept the same records. A record's
    ``"chat": false`` (raw prompt, no template) was read by the SFT JSONL reader and rejected here."""
    tokenizer = CharTokenizer()
    raw, _ = encode_record({"prompt": "q", "response": "a", "chat": False}, tokenizer)
    assert raw.tolist() == encode_record({"prompt": "q", "response": "a"}, tokenizer, chat=False)[0].tolist()
    assert raw.tolist() != encode_record({"prompt": "q", "response": "a"}, tokenizer)[0].tolist()
    templated, _ = encode_record({"prompt": "q", "response": "a", "chat": True}, tokenizer, chat=False)
    assert templated.tolist() == encode_record({"prompt": "q", "response": "a"}, tokenizer)[0].tolist()


def test_parse_record_accepts_both_forms_and_names_bad_fields():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert parse_record({"messages": messages}) == ([messages[0]], "a")
    with pytest.raises(RecordError) as err:
        parse_record({"prompt": "q", "response": "a", "extra": 1})
    assert err.value.field == "extra" and "unknown field" in err.value.reason
    with pytest.raises(RecordError) as err:
        parse_record({"messages": [{"role": "assistant", "content": "a"}]})
    assert err.value.field == "messages"
    with pytest.raises(RecordError) as err:
        encode_record({"prompt": "q" * 50, "response": "a"}, CharTokenizer(), max_tokens=20)
    assert err.value.field == "$" and "max_tokens=20" in err.value.reason
    ids, mask = encode_record({"prompt": "q", "response": "a"}, CharTokenizer(), chat=False)
    assert CharTokenizer().decode(ids) == "<bos>qa<eos>" and mask.tolist() == [0, 0, 1, 1]


def test_command_line_tool_preprocesses_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    tool = _load_tool()
    good, _ = write_dataset(tmp_path / "a.jsonl", 600)
    args = ["--input", str(tmp_path / "a.jsonl"), "--output-dir", str(tmp_path / "out"),
            "--tokenizer", "char", "--chunk-size", "200", "--workers", "2", "--no-progress"]
    assert tool.main([*args, "--max-chunks", "1"]) == 0
    assert "incomplete" in capsys.readouterr().out
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "1 done before, 2 run now" in out and f"complete: {len(good)} documents" in out
    assert np.array_equal(PreprocessedDataset(tmp_path / "out").sequence_lengths,
                          [len(encode_record(r, CharTokenizer())[0]) for r in good])


def test_invalid_utf8_is_a_reject_naming_it_and_only_a_leading_bom_is_accepted(tmp_path: Path):
    good = [json.dumps({"prompt": f"q{i}", "response": "a"}).encode() for i in range(3)]
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + good[0] + b"\n" + b'{"prompt": "caf\xe9", "response": "a"}\n'
                                       + good[1] + b"\n" + b"\xef\xbb\xbf" + good[2] + b"\n")
    report = preprocess(PreprocessConfig([tmp_path / "a.jsonl"], tmp_path / "out", "char", progress=False))
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert report.counts["documents"] == 2
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "$"), (4, "$")]
    assert rejects[0]["reason"].startswith("not valid UTF-8: byte(s) b'\\xe9' at byte 15 of the line")
    assert "BOM" in rejects[1]["reason"]  # a BOM inside the file (e.g. after cat a b) is not silently eaten
    assert [CharTokenizer().decode(ids) for ids, _ in read_all(tmp_path / "out")][0].startswith("<bos><|user|>\nq0")


def test_a_chat_template_error_is_a_reject_naming_the_prompt(tmp_path: Path, smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    from tests.data.test_tokenizer import GEMMA2_STYLE_TEMPLATE

    library = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))
    library.chat_template = GEMMA2_STYLE_TEMPLATE
    library.save_pretrained(str(tmp_path / "tok"))
    tokenizer = load_tokenizer(tmp_path / "tok")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    for record, field in (({"prompt": system, "response": "a"}, "prompt"),
                          ({"messages": [*system, {"role": "assistant", "content": "a"}]}, "messages")):
        with pytest.raises(RecordError) as err:
            encode_record(record, tokenizer)
        assert err.value.field == field and "System role not supported" in err.value.reason
    records = [{"prompt": "q", "response": "a"}, {"prompt": system, "response": "a"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = preprocess(PreprocessConfig([tmp_path / "r.jsonl"], tmp_path / "out", tmp_path / "tok",
                                         progress=False))
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert report.counts["documents"] == 1 and [(r["line"], r["field"]) for r in rejects] == [(2, "prompt")]


def _load_tool():
    path = Path(__file__).resolve().parents[2] / "tools" / "preprocess.py"
    spec = importlib.util.spec_from_file_location("tools_preprocess_cli", path)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_empty_inputs_are_warned_about_and_no_documents_is_a_failure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
    tool = _load_tool()
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q"}) + "\n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    common = ["--tokenizer", "char", "--no-progress"]
    with caplog.at_level("WARNING", logger="megatron_grm.data.preprocess"):
        assert tool.main(["--input", str(tmp_path / "empty.jsonl"), "--output-dir", str(tmp_path / "o1"),
                          *common]) == 1
    assert "error: the run produced no documents" in capsys.readouterr().err
    assert f"{tmp_path / 'empty.jsonl'}: input has no records" in caplog.text
    assert tool.main(["--input", str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path / "o2"),
                      *common]) == 1
    assert "all 1 records were rejected" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_grm.data.preprocess"):
        assert tool.main(["--input", str(tmp_path / "empty.jsonl"), str(tmp_path / "good.jsonl"),
                          "--output-dir", str(tmp_path / "o3"), *common]) == 0
    assert "empty.jsonl: input has no records" in caplog.text and "good.jsonl" not in caplog.text
    manifest = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert [(Path(s["path"]).name, s["records"], s["documents"]) for s in manifest["sources"]] == [
        ("empty.jsonl", 0, 0), ("good.jsonl", 1, 1)]
