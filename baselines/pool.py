"""Spatial average pooling of the visual-token grid before the LLM (downsampling baseline).

VTC-Bench ("Are We Using the Right Benchmark: An Evaluation Framework for Visual Token
Compression Methods", arXiv 2510.07143) found plain downsampling beats many published
token-compression methods, so every report shows it. LLaVA-NeXT/LLaVA-Video use the same
bilinear/average pooling of the grid (github.com/LLaVA-VL/LLaVA-NeXT).

Each grid of h x w tokens is pooled to h' x w' with h' = round(h * sqrt(rho)), half up (the
nearest grid to the budget, methods.grid_side; budgets that are not a square of a stride use
adaptive pooling). Where the visual tokens form several grids (one per image; LLaVA-NeXT's
base image and its tile map, whose image-newline tokens are not prunable and stay), each
grid is pooled on its own; a non-square grid (Qwen2-VL's dynamic resolution) keeps its
aspect ratio. Each pooled token takes the slot and position id of the token nearest its
cell's centre (so Qwen2-VL's M-RoPE positions stay those of a real cell).
Accounting (`grid`): sum of h' x w' over the grids (methods.grid_tokens), which is
round(rho*N) only when each rho*h*w is a square.
A layout with no grid (LLaVA `default` strategy on a tower without [CLS], where the stock
model drops a patch) is refused with one line.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, grid_side, grid_tokens


class Pool(PruningMethod):
    """average-pool each visual-token grid to round(h*sqrt(rho)) x round(w*sqrt(rho)) tokens before the LLM"""

    name = "pool"
    accounting = "grid"

    @staticmethod
    def grids(info: ModelInfo) -> tuple[tuple[int, int], ...]:
        """The grids the visual tokens form (from the model, never stored: plan is pure)."""
        if not info.grids or sum(h * w for h, w in info.grids) != info.num_visual_tokens:
            raise GripbenchError("pool needs visual tokens that form grids; this model's layout has none")
        return info.grids

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, grid_tokens(self.budget, self.grids(info)))]

    def selection_flops(self, info, text_tokens, arch=None):
        """Average pooling: one add per input value."""
        return float(info.num_visual_tokens * info.hidden_size)

    def select(self, ctx, point: PrunePoint) -> Selection:
        feats = ctx.visual_features()  # [B, N, D], each grid in raster order
        b, _, d = feats.shape
        pooled, idx, offset = [], [], 0
        for h, w in self.grids(ctx.info):
            sh, sw = grid_side(self.budget, h), grid_side(self.budget, w)
            grid = feats[:, offset:offset + h * w].transpose(1, 2).reshape(b, d, h, w)
            pooled.append(F.adaptive_avg_pool2d(grid.float(), (sh, sw)).to(feats.dtype).flatten(2).transpose(1, 2))
            rows, cols = _centres(h, sh), _centres(w, sw)
            idx += [offset + r * w + c for r in rows for c in cols]
            offset += h * w
        keep = ctx.visual_ids.gather(1, torch.tensor(idx, device=feats.device).expand(b, -1))
        return Selection(keep, replace=torch.cat(pooled, dim=1))


def _centres(g: int, s: int) -> list[int]:
    """Adaptive pooling cell i of g -> s spans [floor(i*g/s), ceil((i+1)*g/s)); its centre index."""
    return [(math.floor(i * g / s) + math.ceil((i + 1) * g / s) - 1) // 2 for i in range(s)]
