"""GRPO's advantages, KL estimators and loss against hand-computed values; its gradient does what it should."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_grm.spct.grpo import group_advantages
from megatron_grm.train.losses import grpo_loss, kl_penalty


def test_group_advantages_hand_computed():
    # Group 1: rewards [1, -1, -1, -1]: mean -0.5, population std sqrt(0.75).
    # Group 2: all equal -> zero variance, advantages 0.
    got = group_advantages([1, -1, -1, -1, 1, 1, 1, 1], group_size=4, eps=0.0)
    s = math.sqrt(0.75)
    assert got.advantages[:4] == pytest.approx([1.5 / s, -0.5 / s, -0.5 / s, -0.5 / s])
    assert got.advantages[4:] == [0.0] * 4
    assert got.zero_variance_groups == [1]


def test_dr_grpo_advantages_skip_std_scaling():
    got = group_advantages([1, -1, 1, 1], group_size=4, scale_by_std=False)
    assert got.advantages == pytest.approx([0.5, -1.5, 0.5, 0.5])


@pytest.mark.parametrize(("estimator", "gradient_of"), [("k1", None), ("k2", "kl(policy||ref)"),
                                                     ("k3", "kl(ref||policy)")])
def test_kl_estimators_expected_gradient_as_a_loss_term(estimator, gradient_of):
    """The exact expectation over a 5-token vocabulary of the gradient of kl_penalty on a sampled token (the
    sampling not differentiated, as in the GRPO loss): k1 gives zero, so it cannot keep the policy near
    the reference; k2 the gradient of KL(policy || ref); k3 that of KL(ref || policy)."""
    torch.manual_seed(0)
    logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), dim=0)
    logp = torch.log_softmax(logits, dim=0)
    p = logp.exp().detach()
    expected = sum(p[x] * torch.autograd.grad(kl_penalty(logp[x], ref[x], estimator), logits, retain_graph=True)[0]
                   for x in range(5))
    if gradient_of is None:
        assert expected.abs().max() < 1e-12
        return
    q = ref.exp()
    kl = (logp.exp() * (logp - ref)).sum() if gradient_of == "kl(policy||ref)" else (q * (ref - logp)).sum()
    want = torch.autograd.grad(kl, logits)[0]
    assert want.abs().max() > 1e-3
    assert torch.allclose(expected, want, atol=1e-12)


def test_group_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages([1, 1, -1], group_size=4)


def test_kl_estimators_hand_computed():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    lr = ref - logp  # [-0.5, 1.0]
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx((-lr).tolist())
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx((0.5 * lr**2).tolist())
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2.0])
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k4")


def _fixed_batch():
    # Two sequences: the first has 2 judgment tokens, the second 3 (the mask); advantages +1 and -1.
    logprobs = torch.tensor([[-1.0, -0.5, -2.0, 0.0], [-1.3, -0.7, -0.3, -0.9]])
    old = torch.tensor([[-1.0, -0.7, -2.0, 0.0], [-1.0, -0.7, -0.3, -2.0]])
    ref = torch.tensor([[-1.1, -0.6, -2.0, 0.0], [-1.2, -0.8, -0.3, -0.9]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4])
    return logprobs, old, ref, adv, mask


def _hand_loss(aggregation: str, eps: float, beta: float) -> float:
    logprobs, old, ref, adv, mask = _fixed_batch()
    per_seq, all_tokens = [], []
    for b in range(2):
        terms = []
        for t in range(4):
            if mask[b, t] == 0:
                continue
            ratio = math.exp(logprobs[b, t] - old[b, t])
            a = float(adv[b, t])
            pg = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            lr = float(ref[b, t] - logprobs[b, t])
            terms.append(pg + beta * (math.exp(lr) - lr - 1))
        per_seq.append(sum(terms) / len(terms))
        all_tokens += terms
    return sum(per_seq) / 2 if aggregation == "sequence" else sum(all_tokens) / len(all_tokens)


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_loss_hand_computed(aggregation):
    num, den, metrics = grpo_loss(*_fixed_batch(), clip_eps=0.2, beta=0.08, aggregation=aggregation)
    assert float(num) / int(den) == pytest.approx(_hand_loss(aggregation, 0.2, 0.08), rel=1e-6)
    assert int(den) == (2 if aggregation == "sequence" else 5)
    # Token (0,1): ratio e^0.2 > 1.2 with A>0 -> clipped; token (1,0): ratio e^-0.3 < 0.8 with A<0 -> clipped.
    # Token (1,1) has ratio 1; (0,0) ratio 1; (1,2) ratio 1. So 2 of 5 tokens are clipped.
    clip = metrics["clip_fraction"]
    if aggregation == "token":
        assert float(clip[0] / clip[1]) == pytest.approx(2 / 5)
    else:
        assert float(clip[0] / clip[1]) == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_asymmetric_clip_lets_positive_advantages_go_further():
    sym, _, _ = grpo_loss(*_fixed_batch(), clip_eps=0.2, beta=0.0, aggregation="token")
    asym, _, _ = grpo_loss(*_fixed_batch(), clip_eps=0.2, clip_eps_high=0.3, beta=0.0, aggregation="token")
    # Token (0,1) has ratio e^0.2 = 1.221: clipped at 1.2 symmetric, unclipped under 1.3.
    assert float(sym - asym) == pytest.approx(math.exp(0.2) - 1.2, rel=1e-5)


def test_policy_equal_to_reference_has_zero_kl_and_pure_policy_gradient():
    logprobs, old, _, adv, mask = _fixed_batch()
    p1 = logprobs.clone().requires_grad_(True)
    p2 = logprobs.clone().requires_grad_(True)
    num_kl, den, metrics = grpo_loss(p1, old, p1.detach(), adv, mask, beta=0.08)
    num_pg, _, _ = grpo_loss(p2, old, p2.detach(), adv, mask, beta=0.0)
    assert float(metrics["kl"][0]) == 0.0
    (num_kl / den).backward()
    (num_pg / den).backward()
    assert torch.equal(p1.grad, p2.grad)
    assert p1.grad.abs().sum() > 0


def test_gradient_step_raises_logprob_of_positive_advantage_samples():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)  # 2 sequences, 3 tokens, vocab 5
    labels = torch.randint(0, 5, (2, 3))
    mask = torch.ones(2, 3)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])

    def seq_logprob():
        lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
        return lp, lp.sum(dim=1)

    lp, before = seq_logprob()
    num, den, _ = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, beta=0.08)
    (num / den).backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    _, after = seq_logprob()
    assert after[0] > before[0]  # positive advantage: more likely
    assert after[1] < before[1]  # negative advantage: less likely


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_parallel_logprobs_entropy_and_gradient_match_full_softmax(tp, tmp_path):
    """The policy's logprobs, their gradient and the logged entropy from vocab-sharded logits (gloo, TP ranks)
    equal log_softmax on the whole vocabulary; the entropy must be taken before Megatron's cross-entropy
    overwrites the logits with the softmax (which once made every logged entropy ≈ log V)."""
    from tests.conftest import REPO, read_json, torchrun

    out = tmp_path / "report.json"
    torchrun(REPO / "tests" / "grpo" / "scripts" / "vocab_parallel_logprobs.py", tp, [str(out)], timeout=180)
    report = read_json(out)
    assert report["tp"] == tp
    assert report["logprob_max_abs_diff"] < 1e-5
    assert report["grad_max_abs_diff"] < 1e-5
    assert report["entropy_max_abs_diff"] < 1e-5
    assert report["entropy_mean"] < math.log(12) - 0.1  # logits * 3: far from uniform


def test_a_judgment_never_generated_stays_out_of_its_groups_statistics():
    """A judgment whose prompt left no room was scored -1 and counted in its group's mean and std, though
    the policy never wrote it: [+1, -1, -1, never] gave the +1 an advantage from a 4-sample group."""
    got = group_advantages([1, -1, -1, None], group_size=4, eps=0.0)
    mean, std = -1 / 3, math.sqrt(((1 + 1 / 3) ** 2 + 2 * (-1 + 1 / 3) ** 2) / 3)
    assert got.advantages == pytest.approx([(1 - mean) / std, (-1 - mean) / std, (-1 - mean) / std, 0.0])
    lone = group_advantages([1, None, None, None, -1, -1, None, -1], group_size=4)
    assert lone.advantages == [0.0] * 8 and lone.zero_variance_groups == [0, 1]


@pytest.mark.parametrize("updates, recompute, forward", [(1, True, False), (2, True, True), (2, False, False),
                                                         (1, False, False)])
def test_the_old_policy_costs_a_forward_only_with_several_updates_per_rollout(updates, recompute, forward):
    """One update per rollout: the ratio divides by the update's own log-probabilities (detached, so 1 and
    no gradient through it); several: by those computed before the first update; without recompute: by the
    sampler's."""
    from megatron_grm.stages.grpo import GRPOSettings, old_policy_logprobs

    s = GRPOSettings(updates_per_rollout=updates, recompute_old_logprobs=recompute)
    assert s.old_logprobs_forward is forward
    logprobs = torch.tensor([[-0.5, -1.25, -2.0]], requires_grad=True)
    attached = torch.tensor([[-0.75, -1.0, -2.5]])
    old = old_policy_logprobs(logprobs, attached, s)
    on_policy = recompute and updates == 1
    assert torch.equal(old, logprobs.detach() if on_policy else attached) and not old.requires_grad
    _, _, metrics = grpo_loss(logprobs, old, torch.zeros_like(attached), torch.ones(1, 3), torch.ones(1, 3))
    ratio = metrics["ratio"][0] / metrics["ratio"][1]
    assert (ratio.item() == 1.0) is on_policy
