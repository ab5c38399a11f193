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
count equals rho * N: k = (rho*N*L - K*N) / (L - K). K defaults to the paper's 2 of 32
layers scaled to the model's depth (at least 1). A budget below K/L is out of FastV's
reach; it then keeps one token after layer K and the recorded `tokens_layer_avg` shows
the true, higher count. Passing `R` explicitly (with or without `K`) overrides the
mapping, as in the paper's K/R grid.
"""

from __future__ import annotations

import torch

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, topk_sorted


def default_layer(num_layers: int) -> int:
    return max(1, round(2 * num_layers / 32))


class FastV(PruningMethod):
    """drop low-attention image tokens after layer K, R set so the layer-average matches rho"""

    name = "fastv"

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        n, layers = info.num_visual_tokens, info.num_layers
        k_layer = int(self.params.get("K", default_layer(layers)))
        if "R" in self.params:
            keep = round(n * (1 - float(self.params["R"])))
        else:
            keep = round((self.budget * n * layers - k_layer * n) / (layers - k_layer))
        keep = max(1, min(n, keep))
        return [] if keep >= n else [PrunePoint(k_layer, keep)]

    def selection_flops(self, info, text_tokens, arch=None):
        """The attention rows at layer K-1 from its q/k: k for every token, q for the query rows,
        one score row per query (2 x MACs)."""
        points = self.plan(info)
        if not points:
            return 0.0
        t = text_tokens + info.num_visual_tokens
        q_rows = t if self.params.get("variant", "last") == "all" else 1
        kv, hq = arch.kv_heads * arch.head_dim, arch.heads * arch.head_dim
        return 2.0 * (t * arch.dim * kv + q_rows * arch.dim * hq + q_rows * t * hq)

    def select(self, ctx, point: PrunePoint) -> Selection:
        b, t = ctx.key_mask.shape
        device = ctx.key_mask.device
        if self.params.get("variant", "last") == "all":
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
