"""DART's selection rule and budget mapping on hand-computed cases (baselines/dart.py)."""

from __future__ import annotations

import pytest
import torch

from baselines.dart import DART, dart_keep, pivot_quotas
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, layer_counts

# 8 tokens: slot 0 system text, slots 1..5 image, slots 6..7 question.
NORMS = torch.tensor([9.0, 1.0, 5.0, 2.0, 3.0, 4.0, 7.0, 6.0])  # L1 norms of the keys
HIDDEN = torch.tensor([[1.0, 0.0],    # 0 text (never a pivot: before the image, not a candidate)
                       [1.0, 0.0],    # 1 image
                       [1.0, 0.0],    # 2 image: largest image norm (5) -> image pivot
                       [0.0, 1.0],    # 3 image
                       [1.0, 1.0],    # 4 image
                       [-1.0, 0.0],   # 5 image
                       [0.0, 1.0],    # 6 question: largest text norm (7) -> text pivot
                       [1.0, 0.0]])   # 7 question
VISUAL = torch.tensor([1, 2, 3, 4, 5])
TEXT = torch.tensor([6, 7])


def test_tokens_least_similar_to_the_pivots_are_kept():
    # One image pivot (slot 2, position 1) and one text pivot (slot 6); keep 3 -> 2 more tokens,
    # one per pivot, pivots in sequence order.
    # Pivot slot 2 = (1,0): cosine with slots 1,3,4,5 = 1, 0, 0.71, -1 -> least similar slot 5 (position 4).
    # Pivot slot 6 = (0,1): cosine with the rest, slots 1,3,4 = 0, 1, 0.71 -> slot 1 (position 0).
    assert dart_keep(NORMS, HIDDEN, VISUAL, TEXT, 3, pivot_image=1, pivot_text=1).tolist() == [0, 1, 4]
    # keep 4 -> 3 more: 2 for the first pivot (slot 5 at -1, then slot 3 at 0), 1 for the second
    # (slot 1 at 0 beats slot 4 at 0.71).
    assert dart_keep(NORMS, HIDDEN, VISUAL, TEXT, 4, pivot_image=1, pivot_text=1).tolist() == [0, 1, 2, 4]
    # keep 1 -> the image pivot alone.
    assert dart_keep(NORMS, HIDDEN, VISUAL, TEXT, 1, pivot_image=1, pivot_text=1).tolist() == [1]


def test_two_image_pivots_and_no_text_pivot():
    # Image pivots: the two largest image norms, slots 2 (5) and 5 (4) -> positions 1 and 4.
    # keep 3 -> 1 more token, for the first pivot (slot 2 = (1,0)): cosine with slots 1,3,4 =
    # 1, 0, 0.71 -> slot 3 (position 2).
    assert dart_keep(NORMS, HIDDEN, VISUAL, TEXT, 3, pivot_image=2, pivot_text=0).tolist() == [1, 2, 4]
    # No text tokens at all: same.
    assert dart_keep(NORMS, HIDDEN, VISUAL, TEXT[:0], 3, pivot_image=2, pivot_text=4).tolist() == [1, 2, 4]


def test_pivot_quotas():
    assert pivot_quotas(128 - 4, 8) == [16, 16, 16, 16, 15, 15, 15, 15]
    assert pivot_quotas(2, 3) == [1, 1, 0]


def test_layer_average_matches_the_budget():
    info = ModelInfo(num_visual_tokens=576, num_layers=32, hidden_size=64)
    # k = (0.25 * 576 * 32 - 2 * 576) / 30 = 115.2 -> 115; layer average (2*576 + 30*115) / 32 = 143.8
    method = DART(budget=0.25)
    assert method.plan(info) == [PrunePoint(2, 115)] and method.reachable(info)
    for budget in (0.1, 0.25, 0.5, 0.9):
        points = DART(budget=budget).plan(info)
        assert abs(sum(layer_counts(points, info)) / 32 - budget * 576) <= 1
    assert DART(R=1 - 128 / 576).plan(info) == [PrunePoint(2, 128)]  # the official 128 tokens after layer 2
    assert DART(budget=1.0).plan(info) == []


def test_small_budget_is_unreachable_on_a_shallow_model():
    shallow = ModelInfo(num_visual_tokens=576, num_layers=8, hidden_size=64)
    assert not DART(budget=0.1).reachable(shallow)  # layers 0-1 alone average 144 > 57.6
    assert DART(budget=0.1).plan(shallow) == [PrunePoint(2, 1)]
    assert DART(budget=0.3).reachable(shallow)
    assert DART(budget=0.9).plan(ModelInfo(16, 2, 64)) == [PrunePoint(1, 13)]  # K = 1 on 2 layers


@pytest.mark.parametrize("params, message", [
    (dict(K=0), "parameter K of dart must be at least 1"),
    (dict(R=1.0), "parameter R of dart must be in [0, 1), not 1"),
    (dict(pivot_image=0), "parameter pivot_image of dart must be at least 1, not 0"),
    (dict(pivot_text=-1), "parameter pivot_text of dart must be at least 0, not -1"),
])
def test_bad_parameters_are_one_line(params, message):
    with pytest.raises(GripbenchError) as e:
        DART(**params)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
