"""DivPrune: keep a maximally diverse subset of visual tokens before the LLM.

Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar et al., CVPR 2025, arXiv 2503.02175); official code: github.com/vbdi/divprune.

Pruning as a max-min diversity problem on the projector outputs (the LLM's input
embeddings of the image span): distance = 1 - cosine similarity. The first token is the
most isolated one (largest distance to its nearest other token); then, greedily, the
token whose minimum distance to the chosen set is largest. round(rho * N) tokens are
kept, in original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count


def max_min_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] indices chosen greedily by max-min cosine distance from x [B, n, D] (unsorted)."""
    xn = F.normalize(x.float(), dim=-1)
    dist = 1 - xn @ xn.transpose(1, 2)  # [B, n, n]
    b, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest_other = dist.masked_fill(eye, float("inf")).min(-1).values
    chosen = [nearest_other.argmax(-1)]
    min_d = dist.gather(1, chosen[0][:, None, None].expand(-1, 1, n))[:, 0]  # [B, n]
    for _ in range(1, k):
        min_d = min_d.scatter(1, chosen[-1][:, None], -1.0)  # never pick a chosen token again
        nxt = min_d.argmax(-1)
        chosen.append(nxt)
        min_d = torch.minimum(min_d, dist.gather(1, nxt[:, None, None].expand(-1, 1, n))[:, 0])
    return torch.stack(chosen, dim=1)


class DivPrune(PruningMethod):
    """keep round(rho*N) maximally diverse tokens (max-min cosine distance) before the LLM"""

    name = "divprune"
    accounting = "llm_input"

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def selection_flops(self, info, text_tokens, arch=None):
        """The n x n cosine-similarity matrix (2 x MACs); the greedy loop's min/max are not counted."""
        n = info.num_visual_tokens
        return 2.0 * n * n * info.hidden_size

    def select(self, ctx, point: PrunePoint) -> Selection:
        local = max_min_select(ctx.visual_features(), point.keep).sort(dim=-1).values
        return Selection(ctx.visual_ids.gather(1, local))
