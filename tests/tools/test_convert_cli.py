"""The three conversion tools as command lines: a PP=2 conversion that launches its own processes, an
export that reproduces the HF tensors, verification that fails on a wrong model, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_grm.models.hf_io import HFWeights
from tests.models.hf_models import save_random_hf
from tests.tools.cli import describe, last_line, run_tool


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_gemma2")
    paths = {"hf": save_random_hf("gemma2", root / "hf"), "other": save_random_hf("gemma2", root / "other", seed=1),
             "ckpt": root / "ckpt", "out": root / "out"}
    proc = run_tool("convert_hf_to_mcore", "--hf", str(paths["hf"]), "--out", str(paths["ckpt"]), "--pp", "2")
    assert proc.returncode == 0, describe(proc)
    return paths


def test_pp2_conversion_launches_two_ranks_and_writes_latest(gemma2):
    ckpt = gemma2["ckpt"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000000"
    metadata = json.loads((ckpt / "iter_0000000" / "model_config.json").read_text())
    assert metadata["stage"] == "convert" and metadata["layout"] == {"tensor_parallel": 1, "pipeline_parallel": 2}
    assert metadata["model"]["family"] == "gemma2" and metadata["model"]["sliding_window"] == 6
    tokenizer = ckpt / "iter_0000000" / "tokenizer"  # published with the weights it belongs to
    assert Path(metadata["tokenizer"]) == tokenizer.resolve()
    assert (tokenizer / "tokenizer.json").is_file() and not (ckpt / "tokenizer").exists()


def test_verify_fails_against_a_different_model(gemma2):
    """The passing side is shown on SmolLM2 (test_convert_smollm2.py) and per family (tests/models)."""
    proc = run_tool("verify_conversion", "--hf", str(gemma2["other"]), "--ckpt", str(gemma2["ckpt"]))
    assert proc.returncode == 1, describe(proc)
    line = last_line(proc)
    assert line.startswith("max_abs_logit_diff=") and float(line.split("=")[1]) > 1e-2


def test_export_of_pp2_checkpoint_reproduces_the_hf_tensors(gemma2):
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(gemma2["ckpt"]), "--out", str(gemma2["out"]))
    assert proc.returncode == 0, describe(proc)
    original, back = HFWeights(gemma2["hf"]), HFWeights(gemma2["out"])
    assert back.names() == original.names()
    assert all(torch.equal(original.get(n), back.get(n)) for n in original.names())


def test_convert_refuses_unknown_model_type_naming_config_and_type(gemma2, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = json.loads((gemma2["hf"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma3"}))
    proc = run_tool("convert_hf_to_mcore", "--hf", str(folder), "--out", str(tmp_path / "ckpt"), "--tp", "2")
    assert proc.returncode == 2
    assert f"{folder / 'config.json'}" in proc.stderr and "model_type='gemma3' is not supported" in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_export_names_the_missing_checkpoint_file_and_its_tensors(gemma2, tmp_path):
    import shutil

    ckpt = Path(shutil.copytree(gemma2["ckpt"], tmp_path / "ckpt"))
    victim = sorted((ckpt / "iter_0000000").glob("*.distcp"))[0]
    victim.unlink()
    proc = run_tool("convert_mcore_to_hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{victim}: checkpoint data file is missing (it holds tensor " in proc.stderr


def test_convert_refuses_a_folder_without_tokenizer_unless_told(gemma2, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((gemma2["hf"] / name).read_bytes())
    proc = run_tool("convert_hf_to_mcore", "--hf", str(folder), "--out", str(tmp_path / "ckpt"))
    assert proc.returncode == 2 and f"{folder}: no tokenizer files" in proc.stderr and "--no-tokenizer" in proc.stderr
