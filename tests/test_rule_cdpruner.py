"""CDPruner's selection rule (baselines/cdpruner.py): relevance, conditional kernel and the
greedy DPP MAP on hand-computed cases, against brute-force log-determinants, and its budget."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from baselines.cdpruner import CDPruner, conditional_kernel, dpp_greedy, relevance_scores
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, keep_count


def test_relevance_is_the_normalised_negative_cosine():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[2.0, 0.0]])
    # cos = [1, 0, 0.7071]; negated: [-1, 0, -0.7071]; min -1, max 0:
    # (x + 1 + 1e-6) / 1 = [1e-6, 1 + 1e-6, 0.2929 + 1e-6]
    expected = torch.tensor([1e-6, 1 + 1e-6, 1 - math.sqrt(0.5) + 1e-6])
    assert torch.allclose(relevance_scores(image, text), expected, atol=1e-6)
    # two text vectors: the mean over them; text [1, 0] and [0, 1]: cos [[1, 0], [0, 1], [.7071, .7071]]
    # -> negated means [-.5, -.5, -.7071] -> [(.2071 + 1e-6) / .2071, same, 1e-6 / .2071]
    two = relevance_scores(image, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(two, torch.tensor([1.0, 1.0, 0.0]), atol=1e-5)
    # no question tokens: uniform relevance
    assert relevance_scores(image, torch.zeros(0, 2)).tolist() == [1.0, 1.0, 1.0]


def test_greedy_keeps_the_relevant_token_and_skips_its_duplicate():
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.96, 0.28, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = torch.tensor([1.0, 0.9, 0.5, 0.4])
    kernel = conditional_kernel(feats, r)  # L_ij = r_i S_ij r_j, S_01 = 0.96
    # step 1: gains = diag = r^2 = [1, .81, .25, .16] -> 0
    # step 2: gain_i = r_i^2 (1 - S_0i^2): 1: .81 * (1 - .9216) = .0635, 2: .25, 3: .16 -> 2
    # step 3: 1 lies in span(0, 2): gain 0; 3: .16 -> 3
    assert dpp_greedy(kernel, 3).tolist() == [0, 2, 3]
    assert dpp_greedy(kernel, 2).tolist() == [0, 2]
    # relevance alone would keep the duplicate (top-3 of r = {0, 1, 2})
    assert set(torch.topk(r, 3).indices.tolist()) == {0, 1, 2}


def logdet(kernel: torch.Tensor, subset) -> float:
    idx = torch.tensor(list(subset))
    return torch.logdet(kernel.double()[idx][:, idx]).item()


def test_greedy_steps_match_brute_force_log_det():
    g = torch.Generator().manual_seed(0)
    feats, r = torch.randn(6, 5, generator=g), torch.rand(6, generator=g) + 0.1
    kernel = conditional_kernel(feats, r)
    order = dpp_greedy(kernel, 4).tolist()
    # the first step is the exact MAP over all subsets of size 1
    best = max(itertools.combinations(range(6), 1), key=lambda s: logdet(kernel, s))
    assert order[0] == best[0]
    # every step adds the token that maximises log det L[S + j] (brute force over the rest)
    for i in range(1, 4):
        rest = [j for j in range(6) if j not in order[:i]]
        assert order[i] == max(rest, key=lambda j: logdet(kernel, order[:i] + [j]))
    # the exact MAP of size 2 is at least as good as the greedy pair
    best2 = max(logdet(kernel, s) for s in itertools.combinations(range(6), 2))
    assert best2 >= logdet(kernel, order[:2]) - 1e-9


def test_theta_reweights_relevance():
    feats = torch.eye(3)
    r = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(conditional_kernel(feats, r, theta=0.0), torch.eye(3))  # alpha = 0: r = 1
    # theta = 0.5: alpha = 0.5 / (2 * 0.5) = 0.5, r = exp(0.5 r), diagonal exp(r)
    assert torch.allclose(torch.diagonal(conditional_kernel(feats, r, theta=0.5)), torch.exp(r))


def test_rank_deficient_kernel_still_gives_k_distinct_tokens():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 3, generator=g).repeat(3, 1)  # 12 tokens, rank 3, exact duplicates
    kernel = conditional_kernel(feats, torch.rand(12, generator=g))
    for k in range(1, 13):
        picked = dpp_greedy(kernel, k)
        assert picked.numel() == k and picked.unique().numel() == k


def fake_ctx(feats: torch.Tensor, question: torch.Tensor, mask: torch.Tensor):
    b, n, _ = feats.shape
    return SimpleNamespace(projector_features=lambda: feats, question_embeddings=lambda: (question, mask),
                           visual_ids=torch.arange(n).expand(b, n))


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25, 0.125, 0.0625, 0.01])
def test_select_keeps_keep_count_per_row(budget):
    n, d = 144, 16
    method = CDPruner(budget=budget)
    (point,) = method.plan(ModelInfo(num_visual_tokens=n, num_layers=2, hidden_size=d))
    assert point == PrunePoint(0, keep_count(budget, n))
    g = torch.Generator().manual_seed(4)
    feats, question = torch.randn(2, n, d, generator=g), torch.randn(2, 5, d, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    sel = method.select(fake_ctx(feats, question, mask), point)
    assert sel.keep.shape == (2, point.keep)
    assert all(row.unique().numel() == point.keep for row in sel.keep)
    rel = relevance_scores(feats[1], question[1, :2])  # padding question slots are ignored
    assert torch.equal(sel.scores[1], rel)
    if point.keep < n:
        assert sel.keep[1].tolist() == dpp_greedy(conditional_kernel(feats[1], rel), point.keep).sort().values.tolist()


def test_theta_is_checked():
    assert CDPruner(theta="none").theta is None
    with pytest.raises(GripbenchError, match="theta"):
        CDPruner(theta=1.0)
