"""Spatial average pooling of the visual-token grid before the LLM (downsampling baseline).

VTC-Bench ("Are We Using the Right Benchmark: An Evaluation Framework for Visual Token
Compression Methods", arXiv 2510.07143) found plain downsampling beats many published
token-compression methods, so every report shows it. LLaVA-NeXT/LLaVA-Video use the same
bilinear/average pooling of the grid (github.com/LLaVA-VL/LLaVA-NeXT).

The grid of g x g tokens is pooled to g' x g' with g' = round(g * sqrt(rho)), half up (the
nearest grid to the budget, methods.grid_side; budgets that are not a square of a stride use
adaptive pooling).
Each pooled token takes the slot and position id of the token nearest its cell's centre.
Accounting (`grid`): g'^2 tokens, which is round(rho*N) only when rho*N is a square.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, grid_side


def pooled_side(grid: int, budget: float) -> int:
    return grid_side(budget, grid)


class Pool(PruningMethod):
    """average-pool the visual-token grid to round(g*sqrt(rho))^2 tokens before the LLM"""

    name = "pool"
    accounting = "grid"

    @staticmethod
    def grid(info: ModelInfo) -> int:
        """The side g of the square visual-token grid (from the model, never stored: plan is pure)."""
        if info.grid is None or info.grid[0] != info.grid[1]:
            raise GripbenchError("pool needs a square visual-token grid")
        return info.grid[0]

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, pooled_side(self.grid(info), self.budget) ** 2)]

    def selection_flops(self, info, text_tokens, arch=None):
        """Average pooling: one add per input value."""
        return float(info.num_visual_tokens * info.hidden_size)

    def select(self, ctx, point: PrunePoint) -> Selection:
        g = self.grid(ctx.info)
        s = pooled_side(g, self.budget)
        feats = ctx.visual_features()  # [B, N, D] in grid order
        b, n, d = feats.shape
        grid = feats.transpose(1, 2).reshape(b, d, g, g)
        pooled = F.adaptive_avg_pool2d(grid.float(), s).to(feats.dtype).flatten(2).transpose(1, 2)  # [B, s*s, D]
        # adaptive pooling cell i spans [floor(i*g/s), ceil((i+1)*g/s)); its centre token holds the slot
        starts = [math.floor(i * g / s) for i in range(s)]
        ends = [math.ceil((i + 1) * g / s) for i in range(s)]
        centre = [(a + e - 1) // 2 for a, e in zip(starts, ends)]
        idx = torch.tensor([r * g + c for r in centre for c in centre], device=feats.device)
        keep = ctx.visual_ids.gather(1, idx.expand(b, -1))
        return Selection(keep, replace=pooled)
