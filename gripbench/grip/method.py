"""GRIP-VLM and the scorers compared with it, as pruning methods: top-k of a trained scorer
before the LLM.

- `grip`: the scorer after supervised warm-up and GRPO (arXiv 2605.13375, our reading);
- `grip-warmup`: the same scorer after the supervised warm-up only (GRPO's reference policy);
- `dynamicvit`: the same architecture trained end to end through a Gumbel-softmax
  straight-through mask (DynamicViT, arXiv 2106.02034): the continuous-relaxation family.

Each loads its weights from `gripbench/grip/weights/<name>.safetensors` (trained for the
embedded model) or from the parameter `scorer=PATH` (a file written by `gripbench train`). The scorer's
FLOPs and time are the method's own cost.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gripbench.errors import GripbenchError
from gripbench.grip.scorer import BudgetAwareScorer
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count, topk_sorted

WEIGHTS = Path(__file__).parent / "weights"


def save_scorer(scorer: BudgetAwareScorer, path: str | Path, meta: dict | None = None) -> None:
    meta = {"dim": scorer.dim, "width": scorer.width, **(meta or {})}
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(path),
              metadata={"gripbench": json.dumps(meta)})


@lru_cache(maxsize=8)
def load_scorer(path: str) -> BudgetAwareScorer:
    from safetensors import safe_open

    if not Path(path).exists():
        raise GripbenchError(f"no trained scorer at {path}; train one with `gripbench train`")
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["gripbench"])
    scorer = BudgetAwareScorer(meta["dim"], meta["width"])
    scorer.load_state_dict(load_file(path))
    return scorer.eval()


class ScorerMethod(PruningMethod):
    """Top round(rho*N) visual tokens by a trained scorer's logits, before the LLM."""

    weights = "grip"
    accounting = "llm_input"

    scorer: str | None = None  # path of a scorer written by `gripbench train`; None = the shipped weights

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def scorer_model(self, dim: int) -> BudgetAwareScorer:
        """The trained scorer, read from disk once per method instance (not per batch, which
        would charge file I/O to the method's selection latency)."""
        path = self.scorer or str(WEIGHTS / f"{self.weights}.safetensors")
        cached = getattr(self, "_scorer", None)
        if cached is not None and cached[0] == path:
            scorer = cached[1]
        else:
            scorer = load_scorer(path)
            self._scorer = (path, scorer)
        if scorer.dim != dim:
            raise GripbenchError(f"the scorer at {path} was trained for hidden size {scorer.dim}, the model has {dim}; "
                                 f"train one for this model with `gripbench train {self.weights} --model ...`")
        return scorer

    def selection_flops(self, info: ModelInfo, text_tokens: int, arch=None) -> float:
        return float(BudgetAwareScorer(info.hidden_size).flops(info.num_visual_tokens, text_tokens))

    def logits(self, ctx) -> torch.Tensor:
        feats = ctx.visual_features()
        scorer = self.scorer_model(feats.shape[-1]).to(feats.device)
        q, qm = ctx.question_embeddings()
        rho = torch.full((feats.shape[0],), self.budget, device=feats.device)
        with torch.no_grad():
            return scorer(feats, q, qm, rho, ctx.info.grid)

    def select(self, ctx, point: PrunePoint) -> Selection:
        logits = self.logits(ctx)
        return Selection(ctx.visual_ids.gather(1, topk_sorted(logits, point.keep)), scores=logits)


class Grip(ScorerMethod):
    """GRIP-VLM: budget-aware scorer trained by GRPO after a supervised warm-up; top-k before the LLM"""

    name = "grip"
    weights = "grip"


class GripWarmup(ScorerMethod):
    """GRIP's scorer after the supervised warm-up only (the RL reference policy)"""

    name = "grip-warmup"
    weights = "grip-warmup"


class DynamicViT(ScorerMethod):
    """same scorer trained through a Gumbel-softmax straight-through mask (DynamicViT-style relaxation)"""

    name = "dynamicvit"
    weights = "dynamicvit"
