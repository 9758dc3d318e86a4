"""The local spec's core attention (torch SDPA) computes what Megatron-Core's unfused core computes."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, read_json, torchrun

CASES = ("causal_no_mask", "packed_documents", "right_padded_documents", "left_padded_prefill",
         "queries_after_a_cache")


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


def test_right_padded_documents_attend_causally_without_reading_the_mask(report):
    """collate_padded's one-document rows: SDPA's is_causal (skips the blocks above the diagonal), same
    numbers at every position something reads; a packed row keeps its block-diagonal mask."""
    assert report["right_padded_documents"]["is_causal"] is True
    assert report["packed_documents"]["is_causal"] is False and report["packed_documents"]["left_pads"] is None


def test_a_left_padded_prefill_attends_each_row_causally_after_its_padding(report):
    """The rollout's left-padded prefill (prompts of 12, 7 and 4 tokens in 12 positions): each row's real
    tokens by is_causal on their own, each padding query its own value; forward and gradients at every
    position match Megatron's core reading the mask (test above, case left_padded_prefill)."""
    assert report["left_padded_prefill"]["left_pads"] == [0, 5, 8]
    assert report["left_padded_prefill"]["is_causal"] is False


def test_causal_with_isolated_padding_recognises_only_that_layout():
    import torch

    from megatron_grm.data.packing import collate_padded, pack_documents
    from megatron_grm.models.sdpa_attention import causal_with_isolated_padding, left_padding_of_causal
    from megatron_grm.rollout.alignment import left_pad, window_attention_mask
    from megatron_grm.rollout.logprobs import causal_mask

    docs = [([4] * n, [1] * n) for n in (9, 3, 1)]
    assert causal_with_isolated_padding(collate_padded(docs, seq_length=9)["attention_mask"])
    assert causal_with_isolated_padding(collate_padded(docs, seq_length=12)["attention_mask"])
    assert causal_with_isolated_padding(causal_mask(6))
    assert not causal_with_isolated_padding(pack_documents(docs, seq_length=13)["attention_mask"])  # 2 docs in a row
    _, key_padding = left_pad([[1] * 6, [1] * 3], 0, 6)
    assert not causal_with_isolated_padding(window_attention_mask(key_padding, 0, 6))
    assert left_padding_of_causal(window_attention_mask(key_padding, 0, 6)) == (0, 3)
    assert left_padding_of_causal(causal_mask(6)) == (0,)
    assert left_padding_of_causal(window_attention_mask(key_padding, 2, 6)) is None  # queries after a cache
    assert left_padding_of_causal(pack_documents(docs, seq_length=13)["attention_mask"]) is None
    assert left_padding_of_causal(collate_padded(docs, seq_length=12)["attention_mask"]) is None  # right-padded
    peeks = window_attention_mask(key_padding, 0, 6).clone()
    peeks[1, 0, 4, 1] = False  # a real token that sees a padding position
    assert left_padding_of_causal(peeks) is None
    leaky = collate_padded(docs, seq_length=12)["attention_mask"].clone()
    leaky[1, 0, 5, 0] = False  # a padding position that sees a real token
    assert not causal_with_isolated_padding(leaky)
    sees_less = causal_mask(6).clone()
    sees_less[0, 0, 4, 2] = True
    assert not causal_with_isolated_padding(sees_less)
    assert not causal_with_isolated_padding(torch.zeros(1, 1, 3, 4, dtype=torch.bool))  # not square


def test_the_local_spec_builds_the_sdpa_core_and_swiglu(report):
    assert report["core_class"] == "SdpaCoreAttention"
    assert report["model_cores"] == ["SdpaCoreAttention"]
    # and, on CPU, the MLP's SwiGLU from the spec (models/swiglu.py) instead of Megatron's chunk + silu * up
    assert report["mlp_activations"] == ["SwiGLU"] and report["use_te_activation_func"] is True


def test_the_mask_plan_is_cached_per_tensor_and_redone_after_an_in_place_change():
    import torch

    from megatron_grm.models.sdpa_attention import mask_plan

    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    first = mask_plan(mask, torch.float32)
    assert mask_plan(mask, torch.float32) is first  # every layer of one forward shares one copy
    assert first.additive is not None and first.left_pads is None
    mask[..., 0, 2] = True
    again = mask_plan(mask, torch.float32).additive
    assert again is not first.additive and again[0, 0, 0, 2] == float("-inf") and bool((again[0, 0, 1:] == 0).all())
    causal = torch.ones(1, 1, 3, 3, dtype=torch.bool).triu(1)
    assert mask_plan(causal, torch.float32).is_causal  # attend with is_causal
    causal[..., 2, 0] = True  # no longer causal: planned again after the in-place change
    converted = mask_plan(causal, torch.float32).additive
    assert converted is not None and converted[0, 0, 2, 0] == float("-inf") and converted[0, 0, 2, 1] == 0


def test_a_prefill_mask_is_planned_from_the_padding_it_carries(monkeypatch):
    """A mask from window_attention_mask at position 0 is planned from its declared padding counts, without
    the pattern checks (each rebuilds and compares the whole [b, s, s] mask); other masks still get them."""
    import torch

    from megatron_grm.models import sdpa_attention
    from megatron_grm.rollout.alignment import left_pad, window_attention_mask

    _, key_padding = left_pad([[1] * 6, [1] * 3, [1] * 5], 0, 6)
    padded = window_attention_mask(key_padding, 0, 6)
    unpadded = window_attention_mask(torch.zeros(2, 6, dtype=torch.bool), 0, 6)
    want = sdpa_attention.left_padding_of_causal(padded)

    def refuse(mask):
        raise AssertionError("the declared padding should have been used")

    monkeypatch.setattr(sdpa_attention, "causal_with_isolated_padding", refuse)
    monkeypatch.setattr(sdpa_attention, "left_padding_of_causal", refuse)
    assert sdpa_attention.mask_plan(padded, torch.float32).left_pads == want == (0, 3, 1)
    assert sdpa_attention.mask_plan(unpadded, torch.float32).is_causal
    with pytest.raises(AssertionError, match="declared padding"):
        sdpa_attention.mask_plan(padded.clone(), torch.float32)  # a copy carries no counts: checked


def test_the_te_spec_guard_refuses_in_training_only_masks_a_causal_core_would_ignore(report):
    """provider.refuse_masks_the_core_ignores (on TE's causal cores in a GPU build; here on ours): right-padded
    one-document rows and no mask train, a packed batch's mask is refused, inference is left alone."""
    assert report["guarded_cores"] == 2
    guard = report["guard"]
    assert guard["right_padded"] == "ok" and guard["no_mask"] == "ok" and guard["packed_inference"] == "ok"
    assert "ignores this attention mask" in guard["packed_training"]


@pytest.mark.parametrize("case", ["causal_no_mask", "packed_documents"])
def test_widened_bf16_attention_multiplies_fp32_copies_and_rounds_once(report, case):
    """``widen_bf16`` (set where bf16 layers train widened: CPUs without bf16 arithmetic): bf16 q, k and v
    attend as fp32 copies, forward and backward, and the output and gradients are the exact float64 ones on
    the same bf16 values rounded once; unset, torch's bf16 attention kernel runs (what the check would see)."""
    widened, native = report["bf16"][f"{case}_widened"], report["bf16"][f"{case}_bf16"]
    assert "torch.bfloat16" in native["attention_dtypes"]
    assert widened["attention_dtypes"] == ["torch.float32"]
    for side in (widened, native):
        assert side["output_dtype"] == "torch.bfloat16" and side["grad_dtypes"] == ["torch.bfloat16"]
    assert widened["scale"] > 0.1
    assert widened["forward_excess"] <= 0 and widened["grad_excess"] <= 0, widened
