"""GRIP's policy maths: exact Plackett-Luce sampling, its log-probability, GRPO's pieces."""

from __future__ import annotations

import itertools
import math

import torch

from gripbench.grip.policy import group_advantages, grpo_loss, gumbel_top_k, plackett_luce_log_prob
from gripbench.grip.scorer import BudgetAwareScorer


def _pl_prob(logits: list[float], order: tuple[int, ...]) -> float:
    w = [math.exp(x) for x in logits]
    p, left = 1.0, sum(w)
    for i in order:
        p *= w[i] / left
        left -= w[i]
    return p


def test_log_prob_matches_brute_force_and_normalises():
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, 0.7])
    total = 0.0
    for order in itertools.permutations(range(5), 3):
        lp = plackett_luce_log_prob(logits, torch.tensor(order)).item()
        assert math.isclose(math.exp(lp), _pl_prob(logits.tolist(), order), rel_tol=1e-5)
        total += math.exp(lp)
    assert math.isclose(total, 1.0, rel_tol=1e-5)


def test_gumbel_top_k_inclusion_frequencies_match_plackett_luce():
    """Empirical inclusion frequency of each token in a k=2 sample of 4 vs the exact PL value."""
    logits = torch.tensor([1.0, 0.0, -0.5, 0.8])
    exact = [0.0] * 4
    for order in itertools.permutations(range(4), 2):
        p = _pl_prob(logits.tolist(), order)
        for i in order:
            exact[i] += p
    n = 40000
    g = torch.Generator().manual_seed(0)
    samples = gumbel_top_k(logits.expand(n, -1), 2, g)
    freq = torch.bincount(samples.flatten(), minlength=4).float() / n
    for f, e in zip(freq.tolist(), exact):
        assert abs(f - e) < 0.01, (freq, exact)
    # the ordered pairs too: first pick ~ softmax
    first = torch.bincount(samples[:, 0], minlength=4).float() / n
    assert torch.allclose(first, torch.softmax(logits, 0), atol=0.01)


def test_log_prob_gradient_is_finite_for_large_logits():
    logits = torch.tensor([50.0, -50.0, 10.0, 0.0], requires_grad=True)
    lp = plackett_luce_log_prob(logits, torch.tensor([0, 2, 3]))
    lp.backward()
    assert torch.isfinite(lp) and torch.isfinite(logits.grad).all()


def test_group_advantages_are_normalised_per_group():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.2, 0.2, 0.2, 0.2]])
    a = group_advantages(r)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)
    assert torch.all(a[1] == 0)  # no signal in a group of equal rewards


def test_grpo_loss_clipping_and_kl():
    adv = torch.tensor([1.0, -1.0])
    same = torch.zeros(2)
    loss, stats = grpo_loss(same, same, same, adv)
    assert abs(loss.item()) < 1e-6 and stats["kl"] == 0.0
    # a ratio beyond 1 + eps stops helping a positive advantage
    logp = torch.tensor([math.log(2.0), 0.0], requires_grad=True)
    loss, stats = grpo_loss(logp, torch.zeros(2), logp.detach(), adv, clip=0.2, beta=0.0)
    loss.backward()
    assert logp.grad[0].item() == 0.0 and stats["clip_frac"] == 0.5
    # k3 KL is non-negative and zero only at the reference
    lp = torch.tensor([0.3, -0.2])
    _, stats = grpo_loss(lp, lp, torch.zeros(2), torch.zeros(2))
    assert stats["kl"] > 0


def test_scorer_is_budget_aware_and_cheap():
    torch.manual_seed(0)
    s = BudgetAwareScorer(dim=192, width=64)
    v, q = torch.randn(2, 144, 192), torch.randn(2, 9, 192)
    qm = torch.ones(2, 9, dtype=torch.bool)
    a = s(v, q, qm, torch.tensor([0.1, 0.1]), (12, 12))
    b = s(v, q, qm, torch.tensor([0.6, 0.6]), (12, 12))
    assert a.shape == (2, 144) and not torch.allclose(a, b)
    # analytic FLOPs: a few MFLOPs on the embedded model; far below 0.5% of a 7B prefill
    assert s.flops(144, 9) < 10e6
    big = BudgetAwareScorer(dim=4096, width=64)
    llava7b_prefill = 2 * 6.7e9 * 600
    assert big.flops(576, 40) / llava7b_prefill < 0.005


def test_grid_features_per_grid():
    """Position features on several grids (one per image, or LLaVA-NeXT's base image and tile
    map): each grid's tokens get their own grid's features; a count that does not match the
    grids gets none (zeros) rather than wrong positions."""
    from gripbench.grip.scorer import grid_features

    both = grid_features(6 + 2, ((2, 3), (1, 2)), "cpu")
    assert torch.equal(both[:6], grid_features(6, (2, 3), "cpu"))
    assert torch.equal(both[6:], grid_features(2, (1, 2), "cpu"))
    assert not torch.equal(grid_features(6, (2, 3), "cpu"), grid_features(6, (3, 2), "cpu"))
    assert not grid_features(7, ((2, 3),), "cpu").any()
