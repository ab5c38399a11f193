"""VisionZip: dominant tokens by [CLS] attention plus merged contextual tokens, before the LLM.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models"
(Yang et al., CVPR 2025, arXiv 2412.04467); official code: github.com/dvlab-research/VisionZip.

At the vision feature layer (LLaVA: the penultimate CLIP layer):
- dominant tokens: the top tokens by [CLS]-to-patch attention summed over heads;
- contextual tokens: among the remaining tokens, targets are evenly spaced
  (step = n_rest // n_ctx); every other remaining token is assigned to its most similar
  target by cosine similarity of the layer's keys (averaged over heads), and the
  contextual token is the target's feature plus the mean of its assigned tokens.
Merging happens on the vision features before the projector, as in the official code.
The budget is split as the official 64 = 54 dominant + 10 contextual (rounded half up).

[CLS] (parameter `cls`): the official code keeps the tower's [CLS] output as one of the
dominant tokens and feeds it to the LLM (`visionzip(model, dominant=54, contextual=10)` keeps
[CLS] + 53 patches + 10 contextual tokens). `cls="official"` (default) does the same where
the adapter exposes the [CLS] output the LLM does not otherwise see (LLaVA's CLIP tower under
the `default` strategy): per image, [CLS] counts as one of the dominant tokens, its projected
feature fills the image's first slot not otherwise kept (every token here keeps an original
position id; the official code puts [CLS] first and renumbers positions), and the dominant
patches are the top (dominant - 1). At k = N (nothing pruned), with no more kept tokens than
images, or where there is no
such [CLS] (SigLIP, Qwen-VL, Pixtral towers; the `full` strategy, where [CLS] is already an
ordinary visual token; LLaVA-NeXT tiles), the rule is `cls="patches"`: all k tokens are
patches. The parameter is recorded with the cell's method params.
Each contextual token sits in its target's slot (original position id; the official code
appends them after the dominant tokens).
Towers without [CLS] (SigLIP, Qwen-VL, Pixtral) give the mean attention each token
receives instead (the adapter's `vision_attention`). Families whose adapter exposes no
per-token projector input (`pre_projector` None) merge the projector outputs instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count, round_half_up, topk_sorted

DOMINANT_SHARE = 54 / 64


class VisionZip(PruningMethod):
    """keep [CLS]-dominant tokens and merge the rest into contextual tokens before the LLM"""

    name = "visionzip"
    accounting = "llm_input"

    cls: Literal["official", "patches"] = "official"  # [CLS] kept as a dominant token (official), or patches only

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def selection_flops(self, info, text_tokens, arch=None):
        """[CLS] row and keys at the feature layer, key similarity of the remaining tokens to the
        targets, and the projector on the kept tokens (2 x MACs)."""
        t, dv, n = info.num_visual_tokens + 1, arch.vision_dim, info.num_visual_tokens
        k = keep_count(self.budget, n)
        n_ctx = 0 if k <= 1 else k - max(1, round_half_up(k * DOMINANT_SHARE))
        cls_row = t * dv * dv + dv * dv + t * dv
        merge = n * n_ctx * arch.vision_head_dim + k * (dv * info.hidden_size + info.hidden_size ** 2) if n_ctx else 0
        return 2.0 * (cls_row + merge)

    def _cls(self, ctx, k: int) -> torch.Tensor | None:
        """[B, images, Dv] [CLS] outputs to feed the LLM under the official rule, or None."""
        if self.cls != "official" or ctx.vision.pre_projector is None:
            return None
        cls = ctx.vision.extra("cls")
        if cls is None:
            return None
        images, n = cls.shape[1], ctx.visual_ids.shape[1]
        # some token must go (k = N is the unpruned model), and every image keep a free slot
        smallest = int(torch.bincount(ctx.vision.layout.image).min())
        return cls if images < k < n and k - images < smallest else None

    def select(self, ctx, point: PrunePoint) -> Selection:
        k = point.keep
        n_dom = max(1, round_half_up(k * DOMINANT_SHARE)) if k > 1 else 1
        n_ctx = k - n_dom
        cls = self._cls(ctx, k)
        n_dom -= 0 if cls is None else cls.shape[1]  # [CLS] of each image counts as dominant
        attn = ctx.vision_attention().sum(dim=1)  # [B, n]
        b, n = attn.shape
        before_projector = ctx.vision.pre_projector is not None
        feats = ctx.vision_features() if before_projector else ctx.projector_features()
        if cls is None and (n_ctx == 0 or n_dom >= n):
            local = topk_sorted(attn, k)
            return Selection(ctx.visual_ids.gather(1, local), scores=attn)
        dominant = topk_sorted(attn, n_dom)  # [B, n_dom]
        keep_local = dominant
        vectors = feats.gather(1, dominant[..., None].expand(-1, -1, feats.shape[-1])).float()
        if n_ctx:
            targets, contextual = self._contextual(ctx, feats, dominant, n_ctx)
            keep_local, vectors = torch.cat([keep_local, targets], 1), torch.cat([vectors, contextual], 1)
        if cls is not None:
            slots = cls_slots(ctx.vision.layout.image.to(attn.device)[ctx.visual_ids], keep_local)
            keep_local, vectors = torch.cat([keep_local, slots], 1), torch.cat([vectors, cls.float()], 1)
        order = keep_local.argsort(dim=1)
        keep_local = keep_local.gather(1, order)
        replace = vectors.gather(1, order[..., None].expand(-1, -1, vectors.shape[-1])).to(feats.dtype)
        if before_projector:
            replace = ctx.adapter.project(replace)
        return Selection(ctx.visual_ids.gather(1, keep_local), replace=replace, scores=attn)

    @staticmethod
    def _contextual(ctx, feats, dominant, n_ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, n_ctx] target indices, [B, n_ctx, Dv] contextual vectors): evenly spaced targets
        among the non-dominant tokens, each merged with the tokens most similar to it by key."""
        b, n = feats.shape[:2]
        is_dom = torch.zeros(b, n, dtype=torch.bool, device=feats.device).scatter_(1, dominant, True)
        rest = (~is_dom).nonzero()[:, 1].view(b, n - dominant.shape[1])  # ascending
        n_rest = rest.shape[1]
        step = max(1, n_rest // n_ctx)
        t_pos = torch.arange(0, n_rest, step, device=feats.device)[:n_ctx]
        targets = rest[:, t_pos]  # [B, n_ctx]
        keys = F.normalize(ctx.vision_keys().float(), dim=-1)
        rest_keys = keys.gather(1, rest[..., None].expand(-1, -1, keys.shape[-1]))
        sim = rest_keys @ keys.gather(1, targets[..., None].expand(-1, -1, keys.shape[-1])).transpose(1, 2)
        assign = sim.argmax(-1)  # [B, n_rest] target index per remaining token
        is_target = torch.zeros(b, n_rest, dtype=torch.bool, device=feats.device)
        is_target[:, t_pos] = True
        weight = (~is_target).float()
        rest_feats = feats.gather(1, rest[..., None].expand(-1, -1, feats.shape[-1])).float()
        sums = torch.zeros(b, n_ctx, feats.shape[-1], device=feats.device).scatter_add_(
            1, assign[..., None].expand(-1, -1, feats.shape[-1]), rest_feats * weight[..., None])
        counts = torch.zeros(b, n_ctx, device=feats.device).scatter_add_(1, assign, weight)
        target_feats = feats.gather(1, targets[..., None].expand(-1, -1, feats.shape[-1])).float()
        return targets, target_feats + sums / counts.clamp(min=1)[..., None]


def cls_slots(image_of: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[B, images] the slot each image's [CLS] takes: the image's first token not in `kept`
    ([B, k] local indices). `image_of` [B, n] is each token's image within its row."""
    b, n = image_of.shape
    free = torch.ones(b, n, dtype=torch.bool, device=kept.device).scatter_(1, kept, False)
    images = int(image_of.max()) + 1
    slot = torch.arange(n, device=kept.device).expand(b, n)
    out = [torch.where(free & (image_of == i), slot, n).min(dim=1).values for i in range(images)]
    return torch.stack(out, dim=1)
