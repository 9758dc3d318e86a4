"""HF <-> Megatron conversion of random-init Llama, Qwen2 and Gemma-2 models, checked against transformers.

Three launches, shared by every test here: one process converts each family at TP=1, compares logits
and the labelled loss, and exports back; four processes convert at TP=2 x PP=2, reshard the TP=1
checkpoints into that layout and run the pipeline schedule's forward; one process exports the
TP=2 x PP=2 checkpoints. The assertions run here, on files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_grm.models.hf_io import SAFETENSORS_INDEX, HFWeights
from tests.conftest import read_json, torchrun
from tests.models.hf_models import FAMILIES, save_random_hf

SCRIPTS = Path(__file__).parent / "scripts"
LAYOUTS = ("tp1", "tp2pp2")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_families")
    for family in FAMILIES:
        save_random_hf(family, root / f"hf_{family}")
    return root


@pytest.fixture(scope="module")
def tp1_report(work) -> dict:
    torchrun(SCRIPTS / "hf_roundtrip.py", 1, ["--hf-root", str(work), "--work", str(work), "--mode", "tp1"])
    return read_json(work / "report_tp1.json")


@pytest.fixture(scope="module")
def tp2pp2_report(work, tp1_report) -> dict:
    torchrun(SCRIPTS / "convert_parallel.py", 4, ["--hf-root", str(work), "--work", str(work), "--tp", "2",
                                                  "--pp", "2"])
    torchrun(SCRIPTS / "hf_roundtrip.py", 1, ["--hf-root", str(work), "--work", str(work), "--mode", "export",
                                              "--layout", "tp2pp2"])
    return read_json(work / "report_tp2pp2.json")


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = HFWeights(folder)
    return {name: weights.get(name) for name in weights.names()}


def exported(work: Path, layout: str, family: str, request) -> Path:
    request.getfixturevalue("tp1_report" if layout == "tp1" else "tp2pp2_report")
    return work / f"out_{layout}_{family}"


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_match_transformers_within_1e4(family, tp1_report):
    result = tp1_report[family]
    assert result["max_abs_logit"] > 0.01  # the logits are not trivially zero
    assert result["max_abs_logit_diff"] <= 1e-4, result


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_with_labels_equals_cross_entropy_of_transformers_logits_and_backward_reaches_all_params(
        family, tp1_report):
    """For Gemma-2 this shows the final-logit soft-cap is applied before GPTModel's internal loss
    (the padded-vocabulary columns Megatron's loss also normalises over are part of the reference)."""
    result = tp1_report[family]
    assert result["padded_vocab_columns"] == 84
    assert result["max_abs_loss_diff"] <= 1e-4, result
    assert result["all_grads_finite_nonzero"], result


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_reproduces_every_hf_tensor_exactly(family, layout, work, request):
    original, back = hf_tensors(work / f"hf_{family}"), hf_tensors(exported(work, layout, family, request))
    assert sorted(back) == sorted(original)
    different = [name for name in original if not torch.equal(original[name], back[name])]
    assert not different


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_checkpoint_reshards_into_tp2pp2_bit_identically(family, tp2pp2_report):
    result = tp2pp2_report[family]
    assert result["params_checked"] > 0
    assert result["params_differing_after_reshard"] == 0, result


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2pp2_pipeline_forward_loss_matches_transformers_cross_entropy(family, tp2pp2_report):
    """48 tokens through Megatron's schedule at TP=2 x PP=2: summed loss within 1e-4 per token."""
    assert tp2pp2_report[family]["abs_loss_sum_diff"] <= 48 * 1e-4, tp2pp2_report[family]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_folder_loads_in_transformers_with_identical_logits(family, layout, work, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported(work, layout, family, request)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    reference = AutoModelForCausalLM.from_pretrained(work / f"hf_{family}", attn_implementation="eager")
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, reference.eval()(tokens).logits)
    text = "the quick brown fox"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(
        work / f"hf_{family}")(text).input_ids


def test_export_above_shard_threshold_writes_index_covering_every_tensor(work, tp2pp2_report):
    out = work / "out_tp2pp2_llama"
    index = read_json(out / SAFETENSORS_INDEX)
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert not (out / "model.safetensors").exists()
    assert sorted(index["weight_map"]) == sorted(HFWeights(work / "hf_llama").names())


def test_metarm_head_is_exported_as_its_own_safetensors_file(work, tp1_report):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = work / "out_metarm"
    head, expected = load_file(out / "metarm_head.safetensors"), load_file(work / "metarm_expected.safetensors")
    assert sorted(head) == ["bias", "weight"] and head["weight"].shape == (1, 64)
    assert all(torch.equal(head[k], expected[k]) for k in expected)
    with safe_open(str(out / "metarm_head.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "megatron-grm.metarm_head.v1"
    assert not any(name.startswith("metarm") for name in HFWeights(out).names())
