"""PDrop's selection rule and budget mapping on hand-computed cases (baselines/pdrop.py)."""

from __future__ import annotations

import pytest
import torch

from baselines.pdrop import PyramidDrop, pdrop_keep, scaled_layers, stage_counts
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, layer_counts


def test_last_token_attention_ranks_the_image_tokens():
    # 7 tokens: slot 0 text, slots 1..4 image, slots 5..6 text; two heads. Values are binary
    # fractions, so the head means are exact:
    #   image slot:        1      2      3      4
    #   head 0:          0.5    0      0.25   0.125
    #   head 1:          0      0.25   0.25   0.125
    #   mean:            0.25   0.125  0.25   0.125
    # keep 2 -> the two 0.25s: positions 0 and 2. keep 3 -> plus the first 0.125 (tie with
    # position 3 goes to the lower index): 0, 1, 2. The text slots' larger attention is ignored.
    head0 = [0.0625, 0.5, 0.0, 0.25, 0.125, 0.0, 0.0625]
    head1 = [0.3125, 0.0, 0.25, 0.25, 0.125, 0.0, 0.0625]
    attn = torch.tensor([[head0, head1]])  # [B=1, H=2, T=7]
    slots = torch.tensor([[1, 2, 3, 4]])
    assert pdrop_keep(attn, slots, 2).tolist() == [[0, 2]]
    assert pdrop_keep(attn, slots, 3).tolist() == [[0, 1, 2]]
    assert pdrop_keep(attn, slots, 1).tolist() == [[0]]


def test_official_layers_and_lambda():
    assert scaled_layers(32) == [8, 16, 24]
    assert scaled_layers(40) == [10, 20, 30]
    assert scaled_layers(8) == [2, 4, 6]
    assert scaled_layers(3) == [1, 2]
    assert scaled_layers(2) == [1]
    assert scaled_layers(1) == []
    assert stage_counts(0.5, 576, 3) == [288, 144, 72]  # official 50% / 25% / 12.5% of 576
    info = ModelInfo(num_visual_tokens=576, num_layers=32, hidden_size=64)
    assert PyramidDrop(lam=0.5).plan(info) == [PrunePoint(8, 288), PrunePoint(16, 144), PrunePoint(24, 72)]
    assert PyramidDrop(lam=0.5, layers="2,6,12").plan(info) == [PrunePoint(2, 288), PrunePoint(6, 144), PrunePoint(12, 72)]


@pytest.mark.parametrize("budget", [0.25, 0.3, 0.4, 0.469, 0.5, 0.75, 0.9])
def test_layer_average_matches_the_budget(budget):
    info = ModelInfo(num_visual_tokens=576, num_layers=32, hidden_size=64)
    method = PyramidDrop(budget=budget)
    points = method.plan(info)
    counts = layer_counts(points, info)
    assert method.reachable(info)
    assert abs(sum(counts) / 32 - budget * 576) <= max(1, len(points))
    assert all(a.keep > b.keep for a, b in zip(points, points[1:]))  # a pyramid


def test_full_budget_prunes_nothing_and_small_budgets_are_unreachable():
    info = ModelInfo(num_visual_tokens=576, num_layers=32, hidden_size=64)
    assert PyramidDrop(budget=1.0).plan(info) == []
    shallow = ModelInfo(num_visual_tokens=576, num_layers=8, hidden_size=64)
    # layers 0-1 see all 576 tokens: the layer average is at least (2 * 576 + 6) / 8 = 144.75
    low = PyramidDrop(budget=0.1)
    assert not low.reachable(shallow)
    assert layer_counts(low.plan(shallow), shallow) == [576, 576] + [1] * 6
    assert PyramidDrop(budget=0.1, lam=0.5).reachable(shallow)


@pytest.mark.parametrize("params, message", [
    (dict(lam=0.0), "parameter lam of pdrop must be in (0, 1], not 0"),
    (dict(layers="16,8"), "parameter layers of pdrop must be strictly increasing"),
    (dict(layers="0,8"), "parameter layers of pdrop must be strictly increasing"),
    (dict(layers="a"), "parameter layers of pdrop must be strictly increasing"),
])
def test_bad_parameters_are_one_line(params, message):
    with pytest.raises(GripbenchError) as e:
        PyramidDrop(**params)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(GripbenchError, match="must be below the model's 8 LLM layers"):
        PyramidDrop(layers="2,8").plan(ModelInfo(144, 8, 64))
