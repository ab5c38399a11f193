"""Random pruning: keep a uniformly random subset of round(rho * N) visual tokens before the LLM.

A strong baseline in practice: UniPruneBench and VTC-Bench (arXiv 2510.07143) found
several published methods below it.
The subset is drawn per sample from a generator seeded by the method seed and the
sample's own content, so it is reproducible and does not depend on batching.
"""

from __future__ import annotations

import torch

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count


class RandomPruning(PruningMethod):
    """keep a seeded uniformly random round(rho*N) subset before the LLM"""

    name = "random"
    accounting = "llm_input"

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def select(self, ctx, point: PrunePoint) -> Selection:
        n = ctx.visual_ids.shape[1]
        rows = [torch.randperm(n, generator=ctx.generator(i))[: point.keep].sort().values for i in range(ctx.batch_size)]
        local = torch.stack(rows).to(ctx.visual_ids.device)
        return Selection(torch.gather(ctx.visual_ids, 1, local))
