"""VisPruner: important tokens by [CLS] attention, then diverse tokens by similarity de-duplication.

Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (Zhang et al., ICCV 2025, arXiv 2412.01818); official code:
github.com/Theia-4869/VisPruner (`LlavaMetaForCausalLM.encode_images` in llava/model/llava_arch.py).

Of the k = keep_count(rho, N) tokens kept before the LLM:
- important tokens: the int(k * important_ratio) tokens (floor, as the official
  `int(T * r)`; official default r = 0.5) with the highest [CLS]-to-patch attention at the
  vision feature layer, averaged over heads;
- diverse tokens: the other tokens, in descending attention order, are thinned in rounds
  until k - important remain. Each round splits the current list into A (even positions)
  and B (odd positions), scores every A token by its highest cosine similarity to any B
  token, and drops the r = min(8, remaining - wanted) highest-scoring A tokens; the list
  for the next round is the surviving A tokens (in descending score order) followed by B.
Similarity is computed on the vision features before the projector (the feature layer's
patch features, as the official code), or on the projector outputs where the family's
adapter exposes no per-token projector input (`pre_projector` None). Kept tokens keep
their original position ids.

Deviations from the official code:
- the official loop assumes an even number of remaining tokens and at least 2r of them
  (always so for LLaVA's 576 tokens at its budgets; otherwise it fails on a shape
  mismatch); here A is the ceil(R/2) even positions and a round drops at most |A| tokens,
  which is the official procedure wherever that one runs;
- sorting is stable (exact ties go to the lower index), where the official `argsort` is not;
- LLaVA-NeXT: the official code prunes each tile to k tokens; here one selection of k
  tokens is made over all of a row's prunable visual tokens (as every gripbench method);
- towers without [CLS] (SigLIP, Qwen-VL, Pixtral) rank by the mean attention each token
  receives (the adapter's `vision_attention`, as in baselines/visionzip.py; the official
  SigLIP variant also averages attention over queries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count, method_label

ROUND_LIMIT = 8  # the official cap on tokens dropped per de-duplication round


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, exact ties to the lower index."""
    return torch.argsort(scores, descending=True, stable=True)


def dedup_rounds(remaining: int, wanted: int, per_round: int = ROUND_LIMIT) -> list[tuple[int, int]]:
    """(tokens in the list, tokens dropped) for each de-duplication round from `remaining`
    tokens down to `wanted` (what `vispruner_keep` does; FLOPs are counted from it)."""
    rounds = []
    while wanted > 0:
        drop = min(per_round, remaining - wanted, (remaining + 1) // 2)
        if drop <= 0:
            break
        rounds.append((remaining, drop))
        remaining -= drop
    return rounds


def vispruner_keep(attn: torch.Tensor, feats: torch.Tensor, k: int, important: int,
                   per_round: int = ROUND_LIMIT) -> torch.Tensor:
    """Ascending indices of the k tokens VisPruner keeps: attn [n] ([CLS] attention), feats
    [n, D] (features compared for duplicates), `important` of them by attention, at most
    `per_round` duplicates dropped per round."""
    order = _descending(attn)
    chosen, rest = order[:important], order[important:]
    diverse = k - important
    if diverse <= 0:
        return chosen.sort().values
    unit = F.normalize(feats.float(), dim=-1)
    for _, drop in dedup_rounds(rest.numel(), diverse, per_round):
        a, b = rest[0::2], rest[1::2]
        closest = (unit[a] @ unit[b].T).max(dim=-1).values  # each A token's best match in B
        rest = torch.cat([a[_descending(closest)[drop:]], b])
    return torch.cat([chosen, rest]).sort().values


class VisPruner(PruningMethod):
    """keep [CLS]-important tokens plus similarity-de-duplicated diverse tokens before the LLM"""

    name = "vispruner"
    accounting = "llm_input"

    important_ratio: float = 0.5  # share of the kept tokens chosen by [CLS] attention (official 0.5)

    def validate(self) -> None:
        if not 0.0 <= self.important_ratio <= 1.0:
            raise GripbenchError(f"parameter important_ratio of {method_label(self)} must be in [0, 1], "
                                 f"not {self.important_ratio:g}")

    def important_count(self, k: int) -> int:
        """Important tokens among k kept: int(k * ratio), as the official code."""
        return int(k * self.important_ratio)

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def selection_flops(self, info, text_tokens, arch=None):
        """The [CLS] row at the feature layer recomputed from its q/k (k for every token, q for
        CLS, one score row), and each round's A x B similarity on the compared features
        (2 x MACs)."""
        t, dv, n = info.num_visual_tokens + 1, arch.vision_dim, info.num_visual_tokens
        k = keep_count(self.budget, n)
        important = self.important_count(k)
        dim = arch.projector_width
        dedup = sum(((r + 1) // 2) * (r // 2) * dim for r, _ in dedup_rounds(n - important, k - important))
        return 2.0 * (t * dv * dv + dv * dv + t * dv + dedup)

    def select(self, ctx, point: PrunePoint) -> Selection:
        attn = ctx.vision_attention().float().mean(dim=1)  # [B, n]
        feats = ctx.vision_features() if ctx.vision.pre_projector is not None else ctx.projector_features()
        important = self.important_count(point.keep)
        local = torch.stack([vispruner_keep(attn[i], feats[i], point.keep, important) for i in range(attn.shape[0])])
        return Selection(ctx.visual_ids.gather(1, local), scores=attn)
