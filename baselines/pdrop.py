"""PDrop (PyramidDrop): staged visual-token dropping inside the LLM.

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (Xing et al., CVPR 2025, arXiv 2410.17247); official code:
github.com/Cooperx521/PyramidDrop (llava/model/modeling_llama_pdrop.py, `pdrop_rank_drop`).

The LLM is cut into stages at the stage layers (official LLaVA-1.5: 8 / 16 / 24 of 32,
scaled here to the model's depth: round half up, strictly increasing, below the depth).
Before each stage layer l, the image tokens still present are ranked by the attention
that the LAST INSTRUCTION token (the prompt's last token) pays them at layer l itself
(layer l's input norm, q/k after RoPE, softmax over the real tokens, averaged over heads;
the official code scores with `layers[rank_layer]` on that layer's input), and the top
ones are kept for layers l on. Stage s keeps round(lambda^s * N) image tokens (the
official `image_token_ratio_list` [lambda, lambda^2, lambda^3] of the original N; official
lambda = 0.5, i.e. 50% / 25% / 12.5% after layers 8 / 16 / 24).

Budget mapping (design.md, accounting "layer_avg": PDrop's own "equivalent budget" is a
layer average): lambda is chosen by bisection so that the layer-averaged visual token count
of the geometric schedule N, lambda N, lambda^2 N, lambda^3 N (counts rounded half up, at
least one token) is as close as it can be to rho * N. Stages whose count equals the previous
one drop nothing and are left out of the plan. A budget below the share of layers before
the first stage layer (about 8/32 of N on a 32-layer model) is out of reach: `reachable` is
False, every stage keeps one token and the recorded `tokens_layer_avg` shows the true count.
Near that floor the closest schedule is degenerate (rho = 0.25 on 32 layers: one token from
layer 8 on, within a token of 144). Passing `lam` fixes lambda (the budget is then not
used); passing `layers` ("2,6,12") fixes the stage layers, e.g. earlier ones for low budgets.

Deviations from the official code:
- positions: the official code renumbers positions 0..T'-1 after every drop (and ranks with
  the renumbered ones); here every kept token keeps its original position id;
- counts are rounded half up (methods.round_half_up), the official code truncates (int());
- ranking ties go to the lower index (methods.topk_sorted), the official torch.topk order
  is unspecified;
- the official code is LLaVA-1.5/NeXT only; the stage layers are scaled to other depths.

Parameters: layers (str "l1,l2,..." of strictly increasing layers >= 1; None = official
8/16/24 scaled), lam (float in (0, 1]; None = from rho).
"""

from __future__ import annotations

import torch

from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, layer_counts, method_label, round_half_up, topk_sorted

STAGE_LAYERS_32 = (8, 16, 24)  # official LLaVA-1.5 stage boundaries (32 layers)
OFFICIAL_LAMBDA = 0.5


def scaled_layers(num_layers: int) -> list[int]:
    """The official stage layers 8/16/24 of 32 scaled to the model's depth (round half up,
    at least 1, strictly increasing, below num_layers)."""
    out: list[int] = []
    for x in STAGE_LAYERS_32:
        layer = max(round_half_up(x * num_layers / 32), out[-1] + 1 if out else 1)
        if layer < num_layers:
            out.append(layer)
    return out


def stage_counts(lam: float, n: int, stages: int) -> list[int]:
    """Image tokens kept by each stage: round(lam^s * n) half up for s = 1..stages, in [1, n]."""
    return [max(1, min(n, round_half_up(lam ** s * n))) for s in range(1, stages + 1)]


def schedule_points(layers: list[int], counts: list[int], n: int) -> list[PrunePoint]:
    """Prune points of a schedule, leaving out stages that drop nothing."""
    points, present = [], n
    for layer, count in zip(layers, counts):
        if count < present:
            points.append(PrunePoint(layer, count))
            present = count
    return points


def fit_lambda(budget: float, info: ModelInfo, layers: list[int]) -> float:
    """The lambda in [0, 1] whose schedule's layer-averaged count is closest to budget * N
    (bisection; the layer average never decreases with lambda)."""
    n = info.num_visual_tokens
    target = budget * n

    def avg(lam: float) -> float:
        counts = layer_counts(schedule_points(layers, stage_counts(lam, n, len(layers)), n), info)
        return sum(counts) / len(counts)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda lam: abs(avg(lam) - target))


def pdrop_keep(last_attention: torch.Tensor, visual_slots: torch.Tensor, keep: int) -> torch.Tensor:
    """The PDrop rule: [B, keep] positions (into the present visual tokens, ascending) of the
    image tokens the last instruction token attends to most. `last_attention` [B, H, T] is the
    last token's attention row per head, `visual_slots` [B, n] where the image tokens sit."""
    scores = last_attention.float().mean(dim=1).gather(1, visual_slots)  # [B, n], averaged over heads
    return topk_sorted(scores, keep)


class PyramidDrop(PruningMethod):
    """staged in-LLM drop by the last instruction token's attention, geometric lambda (layer-avg = rho)"""

    name = "pdrop"
    accounting = "layer_avg"

    layers: str | None = None  # stage layers "8,16,24"; None = the official 8/16/24 of 32, scaled to the depth
    lam: float | None = None  # fraction kept at each stage; None = derived from the budget

    def validate(self) -> None:
        label = method_label(self)
        if self.lam is not None and not 0.0 < self.lam <= 1.0:
            raise GripbenchError(f"parameter lam of {label} must be in (0, 1], not {self.lam:g}")
        if self.layers is not None:
            try:
                values = [int(x) for x in self.layers.split(",")]
            except ValueError:
                values = []
            if not values or values[0] < 1 or any(b <= a for a, b in zip(values, values[1:])):
                raise GripbenchError(f"parameter layers of {label} must be strictly increasing layers >= 1 separated by "
                                     f"commas (e.g. '8,16,24'), not {self.layers!r}")

    def stage_layers(self, info: ModelInfo) -> list[int]:
        """The stage layers, checked against the model's depth (only known at plan time)."""
        if self.layers is None:
            return scaled_layers(info.num_layers)
        values = [int(x) for x in self.layers.split(",")]
        if values[-1] >= info.num_layers:
            raise GripbenchError(f"parameter layers={self.layers} of {method_label(self)} must be below the model's "
                                 f"{info.num_layers} LLM layers")
        return values

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        layers, n = self.stage_layers(info), info.num_visual_tokens
        lam = self.lam if self.lam is not None else fit_lambda(self.budget, info, layers)
        return schedule_points(layers, stage_counts(lam, n, len(layers)), n)

    def reachable(self, info: ModelInfo) -> bool:
        """False when the closest schedule still misses rho * N by more than one token per
        pruning point (counts bottomed out at one token: too many layers before the first stage)."""
        if self.lam is not None:
            return True
        points = self.plan(info)
        counts = layer_counts(points, info)
        return sum(counts) / len(counts) - self.budget * info.num_visual_tokens <= max(1, len(points))

    def selection_flops(self, info, text_tokens, arch=None):
        """At each stage layer, that layer's keys for every present token, the last token's
        query and its score row (2 x MACs)."""
        kv, hq = arch.kv_heads * arch.head_dim, arch.heads * arch.head_dim
        total, present = 0.0, info.num_visual_tokens
        for point in self.plan(info):
            t = text_tokens + present
            total += t * arch.dim * kv + arch.dim * hq + t * hq
            present = point.keep
        return 2.0 * total

    def select(self, ctx, point: PrunePoint) -> Selection:
        b, t = ctx.key_mask.shape
        last = torch.full((b, 1), t - 1, dtype=torch.long, device=ctx.key_mask.device)  # left padding: last real token
        probs = ctx.attention(last, layer=point.layer)[:, :, 0]  # [B, H, T] at the stage layer, from its input
        local = pdrop_keep(probs, ctx.visual_slots, point.keep)
        scores = probs.float().mean(dim=1).gather(1, ctx.visual_slots)
        return Selection(ctx.visual_ids.gather(1, local), scores=scores)
