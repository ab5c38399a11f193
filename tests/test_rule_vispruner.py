"""VisPruner's selection rule (baselines/vispruner.py) on hand-computed cases, against an
independent transcription of the official batched loop, and its budget."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from baselines.vispruner import VisPruner, dedup_rounds, vispruner_keep
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, keep_count


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_one_round_drops_the_duplicates_of_the_other_half():
    # attention order: 0 (.9), 2 (.8), 4 (.7), 6 (.6), 8 (.5), 9 (.4), 5 (.3), 3 (.2), 1 (.1), 7 (.05)
    attn = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.05, 0.5, 0.4])
    # k = 8, ratio 0.5: important = int(8 * 0.5) = 4 -> {0, 2, 4, 6}; diverse = 4
    # rest (attention order) = [8, 9, 5, 3, 1, 7], R = 6, r = min(8, 6 - 4) = 2
    # A (even positions) = [8, 5, 1], B (odd) = [9, 3, 7]
    feats = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))  # important tokens: never compared
    feats[9], feats[3], feats[7] = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)
    feats[8] = unit(1, 0, 0)       # max cos to B = 1.0 (a copy of 9)
    feats[5] = unit(0.6, 0.8, 0)   # max(0.6, 0.8, 0) = 0.8
    feats[1] = unit(1, 1, 1)       # 1/sqrt(3) = 0.577 to each
    # drop the r = 2 highest of A: 8 and 5 (8 outranks 1 by attention, but duplicates 9)
    kept = vispruner_keep(attn, feats, k=8, important=4)
    assert kept.tolist() == [0, 1, 2, 3, 4, 6, 7, 9]


def test_rounds_reorder_the_survivors_by_similarity():
    # angles in degrees in 2-D; cos = cos(angle difference). Attention order 0, 1, ..., 5.
    angles = [0.0, 0.0, 10.0, 170.0, 90.0, 60.0]
    feats = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    attn = torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    # k = 2, important = 1 -> {0}; rest = [1, 2, 3, 4, 5], one duplicate dropped per round
    # round 1: A = [1, 3, 5], B = [2, 4]; scores 1: max(cos10, cos90) = .985,
    #   3: max(cos160, cos80) = .174, 5: max(cos50, cos30) = .866 -> drop 1;
    #   survivors by descending score: [5, 3]; rest = [5, 3, 2, 4]
    # round 2: A = [5, 2], B = [3, 4]; 5: max(cos110, cos30) = .866, 2: max(cos160, cos80) = .174
    #   -> drop 5; rest = [2, 3, 4]
    # round 3 (R = 3, the odd-R generalisation): A = [2, 4], B = [3]; 2: cos160 = -.94,
    #   4: cos80 = .174 -> drop 4; rest = [2, 3]
    # round 4: A = [2], B = [3] -> drop 2; rest = [3]
    # (keeping A in its old order instead would end with token 5)
    assert vispruner_keep(attn, feats, k=2, important=1, per_round=1).tolist() == [0, 3]
    assert [r for r, _ in dedup_rounds(5, 1, per_round=1)] == [5, 4, 3, 2]


def official_keep(attn: torch.Tensor, feats: torch.Tensor, visual_token_num: int, important_ratio: float) -> torch.Tensor:
    """An independent transcription of the official batched loop (llava_arch.py encode_images),
    for the cases where it runs: attn [B, N], feats [B, N, C] -> [B, T] sorted kept indices."""
    b = attn.shape[0]
    important = int(visual_token_num * important_ratio)
    diverse = visual_token_num - important
    order = attn.argsort(dim=-1, descending=True, stable=True)
    keep, residual = order[:, :important], order[:, important:]
    normed = feats / feats.norm(dim=-1, keepdim=True)
    rows = torch.arange(b)[:, None]
    while diverse > 0:
        big_r = residual.shape[1]
        r = min(8, big_r - diverse)
        if r <= 0:
            break
        tokens = normed[rows, residual]
        sims = (tokens[:, ::2] @ tokens[:, 1::2].transpose(1, 2)).max(dim=-1).values
        distinct = sims.argsort(dim=-1, descending=True, stable=True)[:, r:]
        residual = torch.cat([residual[:, ::2][rows, distinct], residual[:, 1::2]], dim=-1)
    return torch.cat([keep, residual], dim=-1).sort(dim=-1).values


@pytest.mark.parametrize("k,ratio", [(64, 0.5), (128, 0.5), (192, 0.5), (64, 0.75)])
def test_equals_the_official_loop_on_llava_sizes(k, ratio):
    g = torch.Generator().manual_seed(k)
    attn, feats = torch.rand(2, 576, generator=g), torch.randn(2, 576, 16, generator=g)
    expected = official_keep(attn, feats, k, ratio)
    for i in range(2):
        assert vispruner_keep(attn[i], feats[i], k, int(k * ratio)).tolist() == expected[i].tolist()


def test_every_k_keeps_exactly_k_distinct_tokens():
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 7, 23):
        attn, feats = torch.rand(n, generator=g), torch.randn(n, 5, generator=g)
        for k in range(1, n + 1):
            for important in {0, k // 2, k}:
                kept = vispruner_keep(attn, feats, k, important)
                assert kept.numel() == k and kept.unique().numel() == k and 0 <= kept.min() and kept.max() < n


def fake_ctx(attn: torch.Tensor, feats: torch.Tensor, pre_projector: bool):
    b, n = attn.shape
    return SimpleNamespace(
        vision_attention=lambda: attn[:, None].expand(b, 2, n),
        vision=SimpleNamespace(pre_projector=feats if pre_projector else None),
        vision_features=lambda: feats,
        projector_features=lambda: feats,
        visual_ids=torch.arange(n).expand(b, n),
    )


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25, 0.125, 0.0625, 0.01])
def test_select_keeps_keep_count_per_row(budget):
    n = 144
    method = VisPruner(budget=budget)
    (point,) = method.plan(ModelInfo(num_visual_tokens=n, num_layers=2, hidden_size=8))
    assert point == PrunePoint(0, keep_count(budget, n))
    g = torch.Generator().manual_seed(2)
    attn, feats = torch.rand(3, n, generator=g), torch.randn(3, n, 8, generator=g)
    for pre in (True, False):
        keep = method.select(fake_ctx(attn, feats, pre), point).keep
        assert keep.shape == (3, point.keep)
        assert all(row.unique().numel() == point.keep for row in keep)
        for i in range(3):
            assert keep[i].tolist() == vispruner_keep(attn[i], feats[i], point.keep, int(point.keep * 0.5)).tolist()


def test_important_ratio_is_checked():
    assert VisPruner(budget=0.25, important_ratio=1.0).important_count(64) == 64
    with pytest.raises(GripbenchError, match="important_ratio"):
        VisPruner(important_ratio=1.5)
