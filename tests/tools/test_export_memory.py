"""An export holds about one model in host memory: each Megatron tensor is freed once its Hugging Face
pieces are made, and each safetensors shard is written once full. Before, every HF copy was made before the
first byte was written: the loaded model plus all of its copies, twice the model (54 GB more for a bf16
Gemma-2-27B)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_grm.models.hf_io import SAFETENSORS_INDEX, HFWeights
from tests.conftest import REPO, REPO_PYTHONPATH
from tests.tools.cli import describe, run_tool

# In a fresh process: the export with its peak resident memory measured from the moment the model is
# loaded (the kernel's high-water mark, reset through /proc/self/clear_refs), with glibc returning large
# freed blocks to the kernel so that resident memory follows what is alive.
MEASURE = """
import json, sys
from megatron_grm.models import hf_convert
from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel

def resident(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

load, marks = hf_convert.load_megatron_model, {}

def load_then_mark(ckpt):
    loaded = load(ckpt)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from the resident memory now
    marks["loaded"] = resident("VmRSS:")
    return loaded

hf_convert.load_megatron_model = load_then_mark
init_parallel(ParallelLayout())
hf_convert.export_mcore_to_hf(sys.argv[1], sys.argv[2], int(sys.argv[3]), None, with_tokenizer=False)
destroy_parallel()
print(json.dumps({"loaded": marks["loaded"], "peak": resident("VmHWM:")}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_an_export_holds_one_model_and_a_shard_not_two_models(tmp_path: Path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                            num_key_value_heads=16, vocab_size=8192, tie_word_embeddings=False)
    hf = tf.LlamaForCausalLM(config)
    model_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    assert model_bytes > 350e6  # large enough that one model's worth stands out of the process's noise
    hf.save_pretrained(tmp_path / "hf")
    expected = {name: p.detach().clone() for name, p in hf.named_parameters()}
    del hf
    proc = run_tool("convert_hf_to_mcore", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                    "--no-tokenizer")
    assert proc.returncode == 0, describe(proc)

    shard_bytes = 16 * 10**6
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=REPO_PYTHONPATH, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1048576")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "ckpt"), str(tmp_path / "out"),
                           str(shard_bytes)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, describe(proc)
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = marks["peak"] - marks["loaded"]
    # Now: a shard, its serialised bytes and the largest tensor's pieces (~0.2 of the model here); before,
    # every HF copy at once (> 1.0).
    assert growth < 0.4 * model_bytes, f"export grew resident memory by {growth / model_bytes:.2f} models"

    index = json.loads((tmp_path / "out" / SAFETENSORS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 10 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no part files left
    weights = HFWeights(tmp_path / "out")
    assert sorted(weights.names()) == sorted(expected)
    assert all(torch.equal(weights.get(name), expected[name]) for name in expected)
