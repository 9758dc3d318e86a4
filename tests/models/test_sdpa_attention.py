"""The local spec's core attention (torch SDPA) computes what Megatron-Core's unfused core computes."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, read_json, torchrun

CASES = ("causal_no_mask", "packed_documents", "left_padded_prefill", "queries_after_a_cache")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdpa") / "report.json"
    torchrun(REPO / "tests" / "models" / "scripts" / "sdpa_core_parity.py", 1, ["--out", str(out)], timeout=180)
    return read_json(out)


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_megatrons_unfused_core(report, case):
    got = report[case]
    assert got["shape_equal"]
    assert got["scale"] > 0.1  # a real signal, not zeros
    assert got["forward"] <= 1e-5, got
    assert got["grad"] <= 1e-4, got


def test_the_local_spec_builds_the_sdpa_core(report):
    assert report["core_class"] == "SdpaCoreAttention"
    assert report["model_cores"] == ["SdpaCoreAttention"]


def test_the_mask_conversion_is_cached_per_tensor_and_redone_after_an_in_place_change():
    import torch

    from megatron_grm.models.sdpa_attention import additive_mask

    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    first = additive_mask(mask, torch.float32)
    assert additive_mask(mask, torch.float32) is first  # every layer of one forward shares one copy
    mask[..., 0, 2] = True
    again = additive_mask(mask, torch.float32)
    assert again is not first and again[0, 0, 0, 2] == float("-inf") and bool((again[0, 0, 1:] == 0).all())
