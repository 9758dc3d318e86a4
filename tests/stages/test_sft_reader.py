"""The SFT reader (SFT stage, RFT's instruction data): a byte-order mark is not a bad record, and a line of
invalid UTF-8 is one bad record named by file and line, not a crash that loses the file."""

from __future__ import annotations

import json

import pytest


def test_bom_and_invalid_utf8_lines(tmp_path):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.sft import read_sft_jsonl

    good = json.dumps({"prompt": "2+2?", "response": "4", "chat": False}).encode()
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n' + good + b"\n")
    tokenizer = load_tokenizer("char")
    samples = read_sft_jsonl(str(path), tokenizer, seq_length=64, bad_records="skip")
    assert len(samples) == 2 and samples[0] == samples[1]
    with pytest.raises(ValueError, match=rf"{path}:2: not valid UTF-8: byte\(s\) b'\\xe9' at byte 15"):
        read_sft_jsonl(str(path), tokenizer, seq_length=64)



def test_a_bom_before_a_blank_first_line_is_not_a_record(tmp_path):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.sft import read_sft_jsonl

    path = tmp_path / "sft.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n" + json.dumps({"prompt": "2+2?", "response": "4"}).encode() + b"\n")
    assert len(read_sft_jsonl(str(path), load_tokenizer("char"), seq_length=64)) == 1


BAD_SFT_RECORDS = [  # (record, the field and reason the error names); none may crash or vanish
    ({"prompt": 5, "response": "x"}, "prompt: expected a non-empty string"),
    ({"prompt": None, "response": "x"}, "prompt: expected a non-empty string"),
    ({"prompt": [{"role": "user"}], "response": "x"}, r"prompt\[0\]"),
    ({"prompt": "q", "response": "x", "system": "Be terse"}, "system: unknown field"),
    ({"prompt": "q", "response": "x", "chat": "false"}, "chat: expected true or false"),
    ({"prompt": "q", "response": "  "}, "response: expected a non-empty string"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "response": "x"},
     r"prompt\[1\].role: the prompt must end with a user or system turn"),
    ([1, 2], r"\$: expected a JSON object"),
    ('{"prompt": "q", "response": "x", "response": "y"}', "the key 'response' appears twice"),
]


@pytest.mark.parametrize(("record", "reason"), BAD_SFT_RECORDS)
def test_a_bad_sft_record_is_named_by_line_and_field_and_skipping_counts_it(tmp_path, caplog, record, reason):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.sft import read_sft_jsonl

    good = json.dumps({"prompt": "2+2?", "response": "4", "chat": False})
    path = tmp_path / "sft.jsonl"
    line = record if isinstance(record, str) else json.dumps(record)  # a string: the line as written
    path.write_text(good + "\n" + line + "\n" + good + "\n")
    tokenizer = load_tokenizer("char")
    with pytest.raises(ValueError, match=rf"sft.jsonl:2: {reason}"):
        read_sft_jsonl(str(path), tokenizer, seq_length=64)
    assert len(read_sft_jsonl(str(path), tokenizer, seq_length=64, bad_records="skip")) == 2
    assert "skipped 1 bad record(s)" in caplog.text


def test_the_messages_form_reads_as_the_preprocessing_reads_it_and_documents_fit_the_batcher(tmp_path):
    from megatron_grm.data.packing import collate_padded
    from megatron_grm.data.preprocess import encode_record
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.sft import read_sft_jsonl

    tokenizer = load_tokenizer("char")
    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    ids, mask = encode_record(record, tokenizer)
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert read_sft_jsonl(str(path), tokenizer, seq_length=len(ids)) == [(ids.tolist(), mask.tolist())]
    batch = collate_padded(read_sft_jsonl(str(path), tokenizer, seq_length=len(ids)), seq_length=len(ids))
    assert batch["tokens"].shape == (1, len(ids))  # the longest document the reader accepts, the batcher takes
    with pytest.raises(ValueError, match=rf"sft.jsonl:1: {len(ids)} tokens exceed trainer.seq_length={len(ids) - 1}"):
        read_sft_jsonl(str(path), tokenizer, seq_length=len(ids) - 1)

def _preprocessed(tmp_path, records):
    from megatron_grm.data.preprocess import PreprocessConfig, preprocess

    source = tmp_path / "sft.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    preprocess(PreprocessConfig([source], tmp_path / "pre", "char", progress=False))
    return source, tmp_path / "pre"


RECORDS = [{"prompt": f"What is {a}+{b}?", "response": f"{a + b}."} for a in range(4) for b in range(3)]


def test_a_preprocessed_folder_gives_the_samples_the_jsonl_gives(tmp_path):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.sft import read_sft_samples

    source, folder = _preprocessed(tmp_path, RECORDS)
    tokenizer = load_tokenizer("char")
    from_jsonl = read_sft_samples(str(source), tokenizer, seq_length=64)
    from_folder = read_sft_samples(str(folder), tokenizer, seq_length=64)
    assert len(from_folder) == len(from_jsonl) == len(RECORDS)
    for (ids, mask), (want_ids, want_mask) in zip((from_folder[i] for i in range(len(from_folder))), from_jsonl):
        assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_a_preprocessed_folder_of_another_tokenizer_or_too_long_documents_is_refused(tmp_path):
    from megatron_grm.data.tokenizer import load_tokenizer
    from megatron_grm.stages.sft import read_sft_samples

    _, folder = _preprocessed(tmp_path, RECORDS)
    tokenizer = load_tokenizer("char")
    with pytest.raises(ValueError, match=r"documents exceed trainer.seq_length=8 tokens .*--max-tokens 8"):
        read_sft_samples(str(folder), tokenizer, seq_length=8)
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    data["tokenizer"]["sha256"] = "0" * 64  # as if written with another vocabulary
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"manifest.json: field 'tokenizer' .* not this run's tokenizer"):
        read_sft_samples(str(folder), tokenizer, seq_length=64)


def test_the_sft_stage_trains_on_a_preprocessed_folder(tmp_path):
    from tests.conftest import REPO, torchrun

    _, folder = _preprocessed(tmp_path, RECORDS)
    run = tmp_path / "run"
    torchrun(REPO / "megatron_grm" / "stages" / "sft.py", 1, [
        "model=tiny", f"data.train={folder}", f"trainer.run_dir={run}", "trainer.max_steps=2",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.seq_length=64",
        "optimizer.warmup_steps=0"])
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
