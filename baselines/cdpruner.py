"""CDPruner: keep the visual tokens of maximal conditional diversity (a conditional DPP).

Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs" (Zhang et al., NeurIPS 2025, arXiv 2506.10967); official code:
github.com/Theia-4869/CDPruner (`LlavaMetaForCausalLM.encode_images` in llava/model/llava_arch.py).

Before the LLM, per image:
- similarity S: cosine similarity of the projector outputs (the official `image_features`
  after `mm_projector`);
- relevance r: the cosine similarity of each visual token to each instruction vector,
  NEGATED and averaged over the instruction vectors (the official `(-relevance).mean(-1)`),
  then min-max normalised as the official code: (r - min + 1e-6) / (max - min);
- optional theta (commented out in the official code, so off by default): r <- exp(alpha r)
  with alpha = theta / (2 (1 - theta));
- kernel L = diag(r) S diag(r); the k = keep_count(rho, N) tokens are picked by the greedy
  MAP inference of the DPP with the fast incremental-Cholesky update of Chen et al.
  (NeurIPS 2018; Fast-MAP-DPP), with no early stop, as the official code. Kept tokens keep
  their original position ids.

Deviations from the official code:
- instruction vectors: the official LLaVA code embeds the question text with CLIP's text
  tower and compares it to CLIP's projected patch embeddings (post-layernorm + visual
  projection). The models here have no CLIP text tower, so the question tokens' LLM input
  embeddings (`question_embeddings`: the text after the image) are compared with the
  projector outputs (same width), as the OpenVINO port of CDPruner does (it uses every
  non-image token of the prompt); a row without question tokens gets uniform relevance;
- min-max normalisation is per row (the official takes min and max over the whole
  batch, which is one image at its batch size 1, or all tiles of one image on LLaVA-NeXT),
  and a spread below 1e-6 is clamped to 1e-6 (the official divides by zero there);
- where the kernel's rank is spent before k tokens are picked (every remaining gain below
  1e-6 of the largest diagonal entry: k above the feature width, exact duplicates), the
  official loop goes on with rounding noise (and NaN once a gain turns negative, picking
  tokens twice); here the greedy starts again on the tokens not yet picked, so exactly k
  distinct tokens are kept. Ties go to the lower index (as torch's argmax);
- LLaVA-NeXT: the official code prunes each tile to k tokens; here one DPP over all of a
  row's prunable visual tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count, method_label

MIN_GAIN = 1e-12
SPENT = 1e-6  # a gain below this share of the largest diagonal entry adds no volume


def relevance_scores(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[n] instruction relevance of visual tokens image [n, D] to text vectors text [m, D]:
    the mean NEGATIVE cosine similarity, min-max normalised as the official code."""
    if text.shape[0] == 0:
        return torch.ones(image.shape[0], device=image.device)
    cos = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T  # [n, m]
    rel = (-cos).mean(dim=-1)
    return (rel - rel.min() + 1e-6) / (rel.max() - rel.min()).clamp_min(1e-6)


def conditional_kernel(feats: torch.Tensor, relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """[n, n] L = diag(r) S diag(r), S the cosine similarity of feats [n, D]; with theta,
    r is first mapped to exp(theta / (2 (1 - theta)) * r)."""
    unit = F.normalize(feats.float(), dim=-1)
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance[:, None] * (unit @ unit.T) * relevance[None, :]


def _greedy_until_spent(kernel: torch.Tensor, k: int) -> list[int]:
    """Up to k indices, in the order picked, of the greedy MAP of the DPP with kernel [n, n]:
    each step adds the token that most increases log det L[S], found by the incremental
    Cholesky update (gain d_j^2 = L_jj - |c_j|^2; the new row e = (L_j - C^T c_j) / d_j).
    Stops early once no token's gain exceeds SPENT x the largest diagonal entry."""
    n = kernel.shape[0]
    gains = torch.diagonal(kernel).clone().float()
    floor = SPENT * float(gains.max().clamp_min(0))
    rows = torch.zeros(k, n, dtype=gains.dtype, device=kernel.device)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    picked = []
    for i in range(k):
        j = int(gains.masked_fill(taken, float("-inf")).argmax())
        if i > 0 and not float(gains[j]) > floor:
            break
        picked.append(j)
        e = (kernel[j].float() - rows[:i, j] @ rows[:i]) / gains[j].clamp_min(MIN_GAIN).sqrt()
        rows[i] = e
        gains = gains - e * e
        taken[j] = True
    return picked


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """[k] indices, in the order picked, of the greedy MAP of the DPP with kernel [n, n] (the
    fast greedy algorithm of Chen et al.). Where the kernel's rank is spent before k tokens
    (every remaining gain below SPENT x the largest diagonal entry: k above the feature
    width, exact duplicates), the greedy starts again on the tokens not yet picked."""
    picked: list[int] = []
    rest = torch.arange(kernel.shape[0], device=kernel.device)
    while len(picked) < k:
        got = torch.tensor(_greedy_until_spent(kernel[rest][:, rest], k - len(picked)), device=kernel.device)
        picked += rest[got].tolist()
        rest = rest[~torch.isin(rest, rest[got])]
    return torch.tensor(picked, dtype=torch.long, device=kernel.device)


class CDPruner(PruningMethod):
    """keep the tokens of maximal instruction-conditioned diversity (conditional DPP) before the LLM"""

    name = "cdpruner"
    accounting = "llm_input"

    theta: float | None = None  # relevance weight in [0, 1); None = off, as the official code

    def validate(self) -> None:
        if self.theta is not None and not 0.0 <= self.theta < 1.0:
            raise GripbenchError(f"parameter theta of {method_label(self)} must be in [0, 1) or none, not {self.theta:g}")

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def selection_flops(self, info, text_tokens, arch=None):
        """The n x n similarity and n x text relevance on the projector outputs, and the greedy
        steps' projections (step i: i x n) and gain updates (2 x MACs)."""
        n, d = info.num_visual_tokens, info.hidden_size
        k = keep_count(self.budget, n)
        greedy = n * k * (k - 1) // 2 + n * k
        return 2.0 * (n * n * d + n * text_tokens * d + greedy)

    def select(self, ctx, point: PrunePoint) -> Selection:
        feats = ctx.projector_features()  # [B, n, D]
        question, mask = ctx.question_embeddings()  # [B, Tq, D], [B, Tq]
        b, n, _ = feats.shape
        relevance, keep = [], []
        for i in range(b):
            rel = relevance_scores(feats[i], question[i][mask[i]])
            relevance.append(rel)
            if point.keep >= n:
                keep.append(torch.arange(n, device=feats.device))
                continue
            kernel = conditional_kernel(feats[i], rel, self.theta)
            keep.append(dpp_greedy(kernel, point.keep).sort().values)
        local = torch.stack(keep)
        return Selection(ctx.visual_ids.gather(1, local), scores=torch.stack(relevance))
