"""The baseline fixes of issue 5/7, each pinned by a case that failed on the code before it:
rankings of tiny scores, SparseVLM's tied densities, the official layers and K, VisionZip's
official [CLS] rule, and budgets an in-LLM method cannot reach."""

from __future__ import annotations

import pandas as pd
import torch

from baselines.fastv import FastV
from baselines.sparsevlm import density_peak_clusters, scaled_layers
from baselines.visionzip import VisionZip, cls_slots
from gripbench import testing
from gripbench.engine import Engine
from gripbench.methods import ModelInfo, topk_sorted


def test_topk_ranks_tiny_scores_by_value_not_index():
    # FastV's last-token attention on the embedded model is ~1e-11 per token: the old
    # 1e-12 x index tie-break turned 1.05e-11 at index 1 into 0.95e-11, below index 0.
    scores = torch.tensor([[1.00e-11, 1.05e-11, 0.50e-11, 1.02e-11]])
    assert topk_sorted(scores, 1).tolist() == [[1]]
    assert topk_sorted(scores, 2).tolist() == [[1, 3]]
    assert topk_sorted(torch.tensor([[2.0, 5.0, 5.0, 5.0]]), 2).tolist() == [[1, 2]]  # exact ties: lower index


def test_fastv_keeps_the_top_k_of_its_own_scores(embedded, samples):
    """On the embedded model, every row keeps exactly the k best of the scores FastV ranked."""
    seen = []

    class Spy(FastV):
        def select(self, ctx, point):
            sel = super().select(ctx, point)
            seen.append((ctx.visual_ids, sel))
            return sel

    engine = Engine(*embedded)
    engine.generate(testing.contract_batch(engine, samples, n=8), Spy(budget=0.5), max_new_tokens=1)
    (ids, sel), = seen
    k = sel.keep.shape[1]
    for row in range(sel.keep.shape[0]):
        order = sorted(range(ids.shape[1]), key=lambda i: -float(sel.scores[row, i]))  # Python's sort is stable
        assert sel.keep[row].tolist() == sorted(ids[row, order[:k]].tolist())


def test_a_tied_density_pair_gives_one_centre():
    # Two mutual-nearest pairs, A tighter than B: inside each pair both points have the same
    # k-NN density, exactly. With k = 2 clusters there must be one centre per pair (the old
    # +1e-9 x index offset was below float32 resolution: both points of A became centres).
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.3]])
    centres, assign = density_peak_clusters(x, 2)
    assert sorted(centres.tolist()) == [0, 2]  # of a tie, the earlier point; then the other pair
    assert assign.tolist() == [0, 0, 1, 1] or assign.tolist() == [1, 1, 0, 0]


def test_fastv_official_k_and_sparsevlm_official_layers():
    info = ModelInfo(num_visual_tokens=64, num_layers=8, hidden_size=16)
    assert FastV(budget=0.5).layer(info) == 2  # the official K = 2, not scaled to depth
    assert scaled_layers(32) == [3, 7, 16]  # scored with layers 2 / 6 / 15, pruned after them


def test_visionzip_cls_slot_is_each_images_first_free_token():
    image_of = torch.tensor([[0, 0, 0, 1, 1, 1]])
    kept = torch.tensor([[0, 2, 3]])
    assert cls_slots(image_of, kept).tolist() == [[1, 4]]


def test_visionzip_official_rule_feeds_cls_to_the_llm(tiny_hf, samples):
    """On a CLIP-tower LLaVA under the `default` strategy, the official rule puts the tower's
    [CLS] output (projected) in one slot; `patches` keeps k patches and no [CLS]."""
    engine = Engine(*tiny_hf)
    batch = testing.contract_batch(engine, samples, n=2)
    ctx = engine.context(batch)
    cls = ctx.vision.extra("cls")
    assert cls is not None and cls.shape[:2] == (2, 1)
    projected = engine.adapter.project(cls)[:, 0]  # [B, D]
    for rule, expect in (("official", True), ("patches", False)):
        method = VisionZip(budget=0.25, cls=rule)
        sel = method.select(ctx, method.plan(ctx.info)[0])
        assert sel.keep.shape[1] == 4  # round(0.25 x 16)
        has = [bool(torch.isclose(sel.replace[r], projected[r], atol=1e-5).all(-1).any()) for r in range(2)]
        assert has == [expect, expect], rule


def test_an_unreachable_budget_is_recorded(tmp_path):
    """FastV at rho = 1/16 on the 8-layer embedded model: K = 2 full layers already average
    25%, so the cell records the budget as unreachable and what it met."""
    from test_sweep import sweep

    out = tmp_path / "run"
    r = sweep(out, "--methods", "fastv", "--budgets", "0.0625,0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    cells = pd.read_parquet(out / "cells.parquet").set_index("budget")
    low, high = cells.loc[0.0625], cells.loc[0.5]
    assert not low.budget_reachable and high.budget_reachable
    assert low.budget_reached > 0.25  # two of eight layers see every token
    assert abs(high.budget_reached - 0.5) < 1 / 64 + 1e-9
