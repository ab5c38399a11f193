"""SparseVLM: text-guided, progressive visual-token pruning inside the LLM, with recycling.

Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (Zhang et al., ICML 2025, arXiv 2410.04417); official code:
github.com/Gumpest/SparseVLMs (v1 schedule).

- Raters: from the layer-0 input embeddings, relevance of each text token after the
  image = softmax over text of (visual @ text^T), averaged over visual tokens; the text
  tokens above the mean relevance rate the visual tokens.
- At each scoring layer l (the official 2 / 6 / 15 of 32, scaled to the model's depth),
  visual tokens are scored by the raters' attention at that layer (recomputed from its
  q/k after RoPE, averaged over heads and raters) and dropped from its output, so layers
  l + 1 on (3 / 7 / 16 of 32) see the per-layer count of the schedule, as in the official
  code, which prunes the output of the layer it scores with.
- Recycling (parameter `recycle`, default true): of the deleted tokens the top 30% by
  score are clustered (density-peak clustering with k-nearest neighbours, k = number of
  clusters = n_recycled // 10 + 1) and each cluster's mean hidden state is put back, in
  the slot of the cluster centre.

Budget mapping (design.md): SparseVLM's "192 tokens" is a layer average. The official
count profile closest to rho (64 / 128 / 192 of 576) is scaled so that the layer-averaged
visual token count, recycled tokens included, equals rho * N (counts rounded half up). A
budget below the share of layers before the first pruning layer is out of reach
(`reachable` is False); counts then bottom out at one token and the recorded
`tokens_layer_avg` shows the true figure.
Deviation: the official code renumbers positions after pruning; here every token keeps
its original position id (as the official "v2" does).
"""

from __future__ import annotations

import torch

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, layer_counts, round_half_up, topk_sorted

# Official schedules for LLaVA-1.5 (576 tokens, 32 layers): counts kept from the outputs of
# layers 2 / 6 / 15, i.e. first seen by layers 3, 7 and 16.
PROFILES = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
SCORING_LAYERS_32 = (2, 6, 15)


def scaled_layers(num_layers: int) -> list[int]:
    """The layers that first see each pruned count: one past each official scoring layer,
    scaled to the model's depth (scoring layers round half up, strictly increasing)."""
    out: list[int] = []
    for x in SCORING_LAYERS_32:
        scoring = max(round_half_up(x * num_layers / 32), out[-1] if out else 0)
        if scoring + 1 < num_layers:
            out.append(scoring + 1)
    return out


def schedule(budget: float, n: int, num_layers: int) -> list[tuple[int, int]]:
    """[(layer, count)] whose layer-averaged count is as close to budget * n as reachable."""
    layers = scaled_layers(num_layers)
    profile = min(PROFILES, key=lambda p: abs(p / 576 - budget))
    fractions = [c / 576 for c in PROFILES[profile]][: len(layers)]
    bounds = layers + [num_layers]

    def counts(scale: float) -> list[int]:
        out, prev = [], n
        for f in fractions:
            prev = max(1, min(prev, round_half_up(scale * f * n)))
            out.append(prev)
        return out

    def layer_avg(cs: list[int]) -> float:
        return (layers[0] * n + sum((bounds[i + 1] - bounds[i]) * c for i, c in enumerate(cs))) / num_layers

    lo, hi = 0.0, 1.0 / min(fractions)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if layer_avg(counts(mid)) < budget * n else (lo, mid)
    best = min((counts(lo), counts(hi)), key=lambda cs: abs(layer_avg(cs) - budget * n))
    return [(layer, c) for layer, c in zip(layers, best) if c < n]


def recycle_split(count: int, present: int) -> int:
    """Number of recycled clusters inside `count` kept tokens (official: 30% of the deleted
    tokens are recycled into n_recycled // 10 + 1 clusters)."""
    clusters = 0
    for _ in range(3):
        deleted = present - (count - clusters)
        recycled = int(deleted * 0.3) + 1
        clusters = min(recycled, recycled // 10 + 1)
    return clusters if count - clusters >= 1 and present > count else 0


def density_peak_clusters(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres [k], assignment [m]) of x [m, D] by density-peak clustering with k-NN density."""
    m, d = x.shape
    dist = torch.cdist(x.float(), x.float()) / d ** 0.5
    knn = dist.topk(min(k, m), largest=False).values
    density = torch.exp(-(knn ** 2).mean(-1))
    # Token j outranks i when denser, or equally dense and earlier: a strict order, so of a
    # tied pair exactly one can be a centre (the official code adds 1e-6 random noise; an
    # index offset below float32 resolution left float-equal pairs tied, both centres).
    idx = torch.arange(m, device=x.device)
    higher = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    delta = torch.where(higher, dist, torch.full_like(dist, float("inf"))).min(-1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = (delta * density).topk(k).indices
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(k, device=x.device)
    return centres, assign


class SparseVLM(PruningMethod):
    """text-rated progressive pruning inside the LLM with token recycling (layer-avg = rho)"""

    name = "sparsevlm"
    accounting = "layer_avg"

    recycle: bool = True  # merge the best deleted tokens back as cluster centres (official v1)

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(layer, count) for layer, count in schedule(self.budget, info.num_visual_tokens, info.num_layers)]

    def reachable(self, info: ModelInfo) -> bool:
        """False when the closest schedule still misses rho * N by more than one token per
        pruning point (counts bottomed out at one token: too few layers before the first point)."""
        points = self.plan(info)
        avg = sum(layer_counts(points, info)) / info.num_layers
        return avg - self.budget * info.num_visual_tokens <= max(1, len(points))

    def selection_flops(self, info, text_tokens, arch=None):
        """Rater relevance (visual x text embeddings), then at each pruning point the raters'
        attention rows from that layer's q/k (all text tokens counted as raters: an upper
        bound) and the recycling distance matrix (2 x MACs)."""
        n, d = info.num_visual_tokens, info.hidden_size
        kv, hq = arch.kv_heads * arch.head_dim, arch.heads * arch.head_dim
        total, present = n * text_tokens * d, n
        for point in self.plan(info):
            t = text_tokens + present
            total += t * d * kv + text_tokens * d * hq + text_tokens * t * hq
            clusters = recycle_split(point.keep, present) if self.recycle else 0
            if clusters:
                recycled = int((present - point.keep + clusters) * 0.3) + 1
                total += recycled * recycled * d
            present = point.keep
        return 2.0 * total

    def _raters(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R] rater slots in the current sequence, [B, R] validity) from layer-0 embeddings."""
        if "raters" not in ctx._cache:
            text, tmask = ctx.question_embeddings()
            vis = ctx.vision.features.to(text.dtype)
            rel = (vis @ text.transpose(1, 2)).float().masked_fill(~tmask[:, None], float("-inf"))
            rel = torch.softmax(rel, dim=-1).mean(1)  # [B, Tq]
            mean = (rel * tmask).sum(1, keepdim=True) / tmask.sum(1, keepdim=True)
            is_rater = (rel > mean) & tmask
            ctx._cache["raters"] = is_rater
        is_rater = ctx._cache["raters"]
        qslots = ctx.question_mask()  # same text tokens, in order, at their current slots
        b = is_rater.shape[0]
        slots = [qslots[i].nonzero()[:, 0][: is_rater.shape[1]][is_rater[i, : int(qslots[i].sum())]] for i in range(b)]
        r = max(1, max(len(s) for s in slots))
        t = ctx.key_mask.shape[1]
        out = torch.full((b, r), t - 1, dtype=torch.long, device=ctx.key_mask.device)
        valid = torch.zeros(b, r, dtype=torch.bool, device=ctx.key_mask.device)
        for i, s in enumerate(slots):
            out[i, : len(s)], valid[i, : len(s)] = s, True
            if len(s) == 0:  # no rater above the mean (uniform relevance): the last token rates
                valid[i, 0] = True
        return out, valid

    def select(self, ctx, point: PrunePoint) -> Selection:
        raters, valid = self._raters(ctx)
        probs = ctx.attention(raters, layer=point.layer - 1).mean(dim=1)  # [B, R, T]
        w = valid.float()[..., None]
        scores = ((probs * w).sum(1) / w.sum(1)).gather(1, ctx.visual_slots)  # [B, n]
        n = scores.shape[1]
        clusters = recycle_split(point.keep, n) if self.recycle else 0
        top = topk_sorted(scores, point.keep - clusters)
        if clusters == 0:
            return Selection(ctx.visual_ids.gather(1, top), scores=scores)
        feats = ctx.visual_features()
        keep_rows, replace_rows = [], []
        for i in range(scores.shape[0]):
            deleted = torch.ones(n, dtype=torch.bool, device=scores.device)
            deleted[top[i]] = False
            del_idx = deleted.nonzero()[:, 0]
            n_rec = int(del_idx.numel() * 0.3) + 1
            rec = del_idx[scores[i, del_idx].topk(min(n_rec, del_idx.numel())).indices]
            centres, assign = density_peak_clusters(feats[i, rec], clusters)
            merged = torch.zeros(clusters, feats.shape[-1], device=feats.device).index_add_(0, assign, feats[i, rec].float())
            merged = merged / torch.bincount(assign, minlength=clusters).clamp(min=1)[:, None]
            local = torch.cat([top[i], rec[centres]])
            vectors = torch.cat([feats[i, top[i]].float(), merged])
            order = local.argsort()
            keep_rows.append(local[order])
            replace_rows.append(vectors[order])
        keep = ctx.visual_ids.gather(1, torch.stack(keep_rows))
        return Selection(keep, replace=torch.stack(replace_rows).to(feats.dtype), scores=scores)
