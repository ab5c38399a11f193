"""FastV: prune visual tokens inside the LLM by the attention they receive at one layer.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models" (Chen et al., ECCV 2024, arXiv 2403.06764);
official code: github.com/pkunlp-icler/FastV.

Layers 0..K-1 see every token. The attention probabilities of layer K-1, averaged over
heads, rank the image tokens: the official code uses the row of the LAST token
(`variant="last"`, default); the paper's text describes the average over all query rows
(`variant="all"`). The top (1 - R) fraction are kept for layers K..L-1 with their
original position ids.

Budget mapping (design.md): R is derived from rho so that the layer-averaged visual token
count equals rho * N: k = (rho*N*L - K*N) / (L - K), rounded half up like every token count
(methods.round_half_up). K defaults to the official K = 2 whatever the depth (the official
code uses it for 32- and 40-layer models alike; a model of 2 layers gets K = 1). A budget
below about K/L is out of FastV's reach (`reachable` is
False): it then keeps one token after layer K and the recorded `tokens_layer_avg` shows
the true, higher count. Passing `R` explicitly (with or without `K`) overrides the
mapping, as in the paper's K/R grid; the budget is then not used.

Parameters: K (int, 1 <= K < L; None = the official 2), R (float in [0, 1); None =
from rho), variant ('last' | 'all').
"""

from __future__ import annotations

from typing import Literal

import torch

from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, method_label, round_half_up, topk_sorted


def default_layer(num_layers: int) -> int:
    """The official K = 2 (below the model's depth)."""
    return max(1, min(2, num_layers - 1))


class KeepAfterLayer(PruningMethod):
    """The budget mapping of methods that prune once, before LLM layer K (FastV, DART): the
    k tokens kept from layer K on are set so that the layer average is rho * N, or fixed by
    the drop ratio R. Not registered itself."""

    accounting = "layer_avg"

    K: int | None = None  # prune before this LLM layer; None = the official 2
    R: float | None = None  # fraction of image tokens dropped; None = derived from the budget

    def validate(self) -> None:
        if self.K is not None and self.K < 1:
            raise GripbenchError(f"parameter K of {method_label(self)} must be at least 1 (layer 0 is before the LLM), not {self.K}")
        if self.R is not None and not 0.0 <= self.R < 1.0:
            raise GripbenchError(f"parameter R of {method_label(self)} must be in [0, 1), not {self.R:g}")

    def layer(self, info: ModelInfo) -> int:
        """K, checked against the model's depth (only known at plan time)."""
        k = default_layer(info.num_layers) if self.K is None else self.K
        if k >= info.num_layers:
            raise GripbenchError(f"parameter K={k} of {method_label(self)} must be below the model's {info.num_layers} LLM layers")
        return k

    def _raw_keep(self, info: ModelInfo) -> int:
        """Tokens kept after layer K, before clamping to [1, N]."""
        n, layers, k_layer = info.num_visual_tokens, info.num_layers, self.layer(info)
        if self.R is not None:
            return round_half_up(n * (1 - self.R))
        return round_half_up((self.budget * n * layers - k_layer * n) / (layers - k_layer))

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        n = info.num_visual_tokens
        keep = max(1, min(n, self._raw_keep(info)))
        return [] if keep >= n else [PrunePoint(self.layer(info), keep)]

    def reachable(self, info: ModelInfo) -> bool:
        """False when the mapping had to clamp the kept count up to one token (rho below about K/L)."""
        return self.R is not None or self._raw_keep(info) >= 1


class FastV(KeepAfterLayer):
    """drop low-attention image tokens after layer K, R set so the layer-average matches rho"""

    name = "fastv"

    variant: Literal["last", "all"] = "last"  # rank by the last token's attention row, or by all rows

    def selection_flops(self, info, text_tokens, arch=None):
        """The attention rows at layer K-1 from its q/k: k for every token, q for the query rows,
        one score row per query (2 x MACs)."""
        points = self.plan(info)
        if not points:
            return 0.0
        t = text_tokens + info.num_visual_tokens
        q_rows = t if self.variant == "all" else 1
        kv, hq = arch.kv_heads * arch.head_dim, arch.heads * arch.head_dim
        return 2.0 * (t * arch.dim * kv + q_rows * arch.dim * hq + q_rows * t * hq)

    def select(self, ctx, point: PrunePoint) -> Selection:
        b, t = ctx.key_mask.shape
        device = ctx.key_mask.device
        if self.variant == "all":
            queries = torch.arange(t, device=device).expand(b, t)
            probs = ctx.attention(queries, layer=point.layer - 1).mean(dim=1)  # [B, T, T]
            valid = ctx.key_mask.float()  # padding rows do not vote
            scores = (probs * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        else:
            last = torch.full((b, 1), t - 1, dtype=torch.long, device=device)
            scores = ctx.attention(last, layer=point.layer - 1).mean(dim=1)[:, 0]  # [B, T]
        visual_scores = scores.gather(1, ctx.visual_slots)
        local = topk_sorted(visual_scores, point.keep)
        return Selection(ctx.visual_ids.gather(1, local), scores=visual_scores)
