"""Per-request random streams (rollout/streams.py): the keys, the counter-based uniforms, the inverse-CDF
draw and its top-k / top-p filtering against Megatron-Core's own sampler."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_grm.rollout.streams import (
    draw_tokens,
    filter_logits,
    request_keys,
    splitmix64_reference,
    stream_uniforms,
)


def keys_for(count: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor(request_keys(seed, [[i] for i in range(count)], 1))


def test_tensor_uniforms_equal_the_plain_integer_splitmix64():
    keys = torch.tensor(request_keys(7, [[1, 2, 3], [9], [5, 5]], 3) + [0, -1, 2**63 - 1, -(2**63)])
    counters = torch.tensor([0, 1, 2, 3, 1000, 2**40, 17, 5, 0, 1, 2, 3, 4])
    got = stream_uniforms(keys, counters)
    want = [splitmix64_reference(k % 2**64, c) for k, c in zip(keys.tolist(), counters.tolist())]
    assert got.tolist() == want
    assert 0.0 <= float(got.min()) and float(got.max()) < 1.0


def test_uniforms_are_uniform_and_a_stream_does_not_repeat():
    u = stream_uniforms(keys_for(1).expand(100_000), torch.arange(100_000))
    assert len(set(u.tolist())) == 100_000
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 27.9  # 9 degrees of freedom, p = 0.001


def test_keys_depend_on_seed_prompt_and_sample_number_only():
    p, q, r = [1, 2, 3], [4, 5], [1, 2]
    keys = request_keys(3, [p, q], 2)
    assert len(set(keys)) == 4
    assert request_keys(3, [q, r, p], 2)[4:] == keys[:2]  # other company, other order
    assert request_keys(3, [p, p], 1) == keys[:2]  # the m-th sample of p, however it is asked for
    assert request_keys(3, [p, q, p], 1) == [keys[0], keys[2], keys[1]]
    assert set(request_keys(4, [p, q], 2)).isdisjoint(keys)
    assert request_keys(3, [[1, 2, 3, 0]], 1)[0] not in keys  # a prompt one token longer


def test_draws_follow_the_distribution_and_never_pick_probability_zero():
    probs = torch.tensor([0.5, 0.2, 0.0, 0.25, 0.05])
    rows = 50_000
    tokens = draw_tokens(probs.log().expand(rows, -1), 1.0, 0, 1.0, stream_uniforms(keys_for(rows), torch.zeros(rows)))
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[2] == 0
    expected = probs.double() * rows
    chi2 = float(((counts - expected)[expected > 0] ** 2 / expected[expected > 0]).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_a_uniform_at_the_top_of_the_range_still_draws_a_real_token():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    for u in (0.0, 1.0 - 2.0**-53, 1.0):
        token = int(draw_tokens(logits, 1.0, 0, 1.0, torch.tensor([u], dtype=torch.float64)))
        assert token in (0, 1)


def test_temperature_sharpens_as_softmax_of_scaled_logits():
    logits = torch.tensor([1.0, 0.0, -1.0])
    rows = 40_000
    u = stream_uniforms(keys_for(rows, seed=5), torch.zeros(rows))
    tokens = draw_tokens(logits.expand(rows, -1), 0.5, 0, 1.0, u)
    freq = torch.bincount(tokens, minlength=3).double() / rows
    want = torch.softmax(logits.double() / 0.5, dim=0)
    assert torch.allclose(freq, want, atol=0.01)


def test_top_k_one_is_the_argmax_without_drawing():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw_tokens(logits, 0.3, 1, 1.0, torch.rand(4, dtype=torch.float64)), logits.argmax(-1))


def test_top_p_keeps_the_prefix_up_to_the_token_that_crosses_it():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(filter_logits(logits, 0, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.4) == [True, False, False, False]  # the most probable token already crosses 0.4
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True] * 4


@pytest.mark.parametrize("top_k, top_p", [(3, 0.0), (0, 0.6), (0, 0.9)])
def test_filters_keep_what_megatrons_sampler_draws_from(top_k, top_p):
    """Megatron-Core's static sampler (torch.multinomial after its own filtering) drawn 4,000 times per row
    reaches exactly the tokens our filter keeps, and our draws stay inside them."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)) * 1.5
    megatron = SimpleNamespace(sampling_rng=torch.Generator().manual_seed(2))
    draws = 4_000
    repeated = logits.repeat_interleave(draws, dim=0)
    theirs = TextGenerationController._torch_sampling_func(megatron, repeated, 1.0, top_k, top_p).view(3, draws)
    ours = draw_tokens(repeated, 1.0, top_k, top_p, stream_uniforms(keys_for(3 * draws), torch.zeros(3 * draws)))
    kept = torch.isfinite(filter_logits(logits, top_k, top_p))
    for row in range(3):
        assert set(theirs[row].tolist()) == set(torch.nonzero(kept[row]).flatten().tolist())
        assert set(ours.view(3, draws)[row].tolist()) <= set(torch.nonzero(kept[row]).flatten().tolist())
    # Same distribution as Megatron's after filtering: frequencies within 4 standard errors.
    probs = torch.softmax(filter_logits(logits, top_k, top_p).double(), dim=-1)
    for row in range(3):
        freq = torch.bincount(ours.view(3, draws)[row], minlength=12).double() / draws
        se = torch.sqrt(probs[row] * (1 - probs[row]) / draws)
        assert bool(((freq - probs[row]).abs() <= 4 * se + 1e-12).all())


@pytest.mark.gpu
def test_cuda_streams_give_the_cpu_uniforms_and_tokens():
    keys = torch.tensor(request_keys(9, [[i, i + 1] for i in range(64)], 4))
    counters = torch.arange(keys.numel()) * 7
    cpu = stream_uniforms(keys, counters)
    gpu = stream_uniforms(keys.cuda(), counters.cuda())
    assert torch.equal(cpu, gpu.cpu())
    logits = torch.randn(keys.numel(), 1000, generator=torch.Generator().manual_seed(3))
    same = draw_tokens(logits, 0.7, 0, 1.0, cpu) == draw_tokens(logits.cuda(), 0.7, 0, 1.0, gpu).cpu()
    assert float(same.double().mean()) >= 0.99  # float32 cumulative sums may round differently at a boundary
    assert math.isfinite(float(gpu.sum()))
