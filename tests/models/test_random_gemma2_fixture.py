"""The random Gemma-2 used for parity tests is sensitive to every Gemma-2 feature, so parity means something."""

from __future__ import annotations

import pytest
import torch

from tests.models.hf_models import random_model


def _without(feature: str):
    model = random_model("gemma2")
    for layer in model.model.layers:
        attn = layer.self_attn
        if feature == "attention soft-cap":
            attn.attn_logit_softcapping = None
        elif feature == "sliding window":
            attn.sliding_window = None
        elif feature == "query_pre_attn_scalar":
            attn.scaling = attn.head_dim**-0.5
    if feature == "final soft-cap":
        model.config.final_logit_softcapping = None
    if feature == "sliding window":
        model.config.layer_types = ["full_attention"] * len(model.model.layers)
    return model


TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    with torch.no_grad():
        return random_model("gemma2")(TOKENS).logits


@pytest.mark.parametrize("feature", ["attention soft-cap", "final soft-cap", "sliding window",
                                     "query_pre_attn_scalar"])
def test_each_gemma2_feature_moves_the_logits_far_beyond_the_parity_tolerance(feature, reference):
    with torch.no_grad():
        changed = _without(feature)(TOKENS).logits
    assert (changed - reference).abs().max() > 1e-2  # 100x the 1e-4 parity tolerance
