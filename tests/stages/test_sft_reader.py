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
