"""[CLS]-attention pruning before the LLM (FasterVLM-style).

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (FasterVLM, arXiv 2412.01818); official code: github.com/Theia-4869/FasterVLM.
Each patch is scored by the vision tower's [CLS]-to-patch attention at the feature layer
(LLaVA: the penultimate layer), averaged over heads; the top round(rho * N) are kept in
their original order. Towers without a CLS token (SigLIP) use the mean attention each
patch receives. The attention row is computed from the layer's q/k, so the tower keeps
running with SDPA.
"""

from __future__ import annotations

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count, topk_sorted


class AttentionScore(PruningMethod):
    """keep the top round(rho*N) tokens by vision [CLS] attention (FasterVLM)"""

    name = "attention-score"
    accounting = "llm_input"

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def selection_flops(self, info, text_tokens, arch=None):
        """The [CLS] row at the feature layer, recomputed from its q/k: k for every token, q for
        CLS, one score row (2 x MACs)."""
        t, dv = info.num_visual_tokens + 1, arch.vision_dim
        return 2.0 * (t * dv * dv + dv * dv + t * dv)

    def select(self, ctx, point: PrunePoint) -> Selection:
        scores = ctx.vision_attention().mean(dim=1)
        local = topk_sorted(scores, point.keep)
        return Selection(ctx.visual_ids.gather(1, local), scores=scores)
