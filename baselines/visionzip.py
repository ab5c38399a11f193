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

Deviation: the official LLaVA integration also keeps the CLS token as a dominant token;
LLaVA-1.5's default feature selection has no slot for CLS, so here all k tokens are
patches. Each contextual token sits in its target's slot (original position id).
Towers without [CLS] (SigLIP, Qwen-VL, Pixtral) give the mean attention each token
receives instead (the adapter's `vision_attention`). Families whose adapter exposes no
per-token projector input (`pre_projector` None) merge the projector outputs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count, round_half_up, topk_sorted

DOMINANT_SHARE = 54 / 64


class VisionZip(PruningMethod):
    """keep [CLS]-dominant tokens and merge the rest into contextual tokens before the LLM"""

    name = "visionzip"
    accounting = "llm_input"

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

    def select(self, ctx, point: PrunePoint) -> Selection:
        k = point.keep
        n_dom = max(1, round_half_up(k * DOMINANT_SHARE)) if k > 1 else 1
        n_ctx = k - n_dom
        attn = ctx.vision_attention().sum(dim=1)  # [B, n]
        b, n = attn.shape
        if n_ctx == 0 or n_dom >= n:
            local = topk_sorted(attn, k)
            return Selection(ctx.visual_ids.gather(1, local), scores=attn)
        dominant = topk_sorted(attn, n_dom)  # [B, n_dom]
        is_dom = torch.zeros(b, n, dtype=torch.bool, device=attn.device).scatter_(1, dominant, True)
        rest = (~is_dom).nonzero()[:, 1].view(b, n - n_dom)  # ascending
        n_rest = rest.shape[1]
        step = max(1, n_rest // n_ctx)
        t_pos = torch.arange(0, n_rest, step, device=attn.device)[:n_ctx]
        targets = rest[:, t_pos]  # [B, n_ctx]
        keys = F.normalize(ctx.vision_keys().float(), dim=-1)
        before_projector = ctx.vision.pre_projector is not None
        feats = ctx.vision_features() if before_projector else ctx.projector_features()
        rest_keys = keys.gather(1, rest[..., None].expand(-1, -1, keys.shape[-1]))
        sim = rest_keys @ keys.gather(1, targets[..., None].expand(-1, -1, keys.shape[-1])).transpose(1, 2)
        assign = sim.argmax(-1)  # [B, n_rest] target index per remaining token
        is_target = torch.zeros(b, n_rest, dtype=torch.bool, device=attn.device)
        is_target[:, t_pos] = True
        weight = (~is_target).float()
        rest_feats = feats.gather(1, rest[..., None].expand(-1, -1, feats.shape[-1])).float()
        sums = torch.zeros(b, n_ctx, feats.shape[-1], device=attn.device).scatter_add_(
            1, assign[..., None].expand(-1, -1, feats.shape[-1]), rest_feats * weight[..., None])
        counts = torch.zeros(b, n_ctx, device=attn.device).scatter_add_(1, assign, weight)
        target_feats = feats.gather(1, targets[..., None].expand(-1, -1, feats.shape[-1])).float()
        contextual = target_feats + sums / counts.clamp(min=1)[..., None]
        keep_local = torch.cat([dominant, targets], dim=1)
        order = keep_local.argsort(dim=1)
        keep_local = keep_local.gather(1, order)
        merged_vision = torch.cat([feats.gather(1, dominant[..., None].expand(-1, -1, feats.shape[-1])).float(),
                                   contextual], dim=1).gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))
        replace = merged_vision.to(feats.dtype)
        if before_projector:
            replace = ctx.adapter.project(replace)
        return Selection(ctx.visual_ids.gather(1, keep_local), replace=replace, scores=attn)
