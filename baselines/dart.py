"""DART: duplication-aware visual-token pruning inside the LLM, without attention weights.

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More" (Wen et al., EMNLP 2025, arXiv 2502.11494); official code:
github.com/ZichenWen1/DART (LLaVA: llava/model/language_model/modeling_llama_self.py,
`get_retained_image_token`; LLaVA-1.5 scripts: K = 2, 4 image + 4 text pivots).

Before LLM layer K (official K = 2), as in the official code:
- pivots: the key states of layer K-1 (after its input norm and RoPE, all heads
  concatenated) give each token an L1 norm; the `pivot_image` image tokens with the largest
  norm (official 4) and the `pivot_text` text tokens after the image with the largest norm
  (the question and answer prompt; official 4) are the pivots;
- duplicates: the hidden states entering layer K, through the LLM's final norm (the
  official `self.norm(layer_outputs[0])`), are compared by cosine similarity; for each pivot
  in turn, the image tokens not yet chosen (image pivots excluded) LEAST similar to it are
  chosen, an equal share per pivot;
- kept: the image pivots and every chosen token, for layers K..L-1, with their original
  position ids (as in the official code, which sets position_ids to the kept indices).
No attention weights are needed (works with FlashAttention).

Budget mapping (design.md, accounting "layer_avg", as FastV here): the official budget is
the number of image tokens kept after layer K (`max_num_trunction`, e.g. 128 of 576); here
that count k is derived from rho so that the layer-averaged visual token count equals
rho * N: k = (rho*N*L - K*N) / (L - K), rounded half up. K defaults to the official 2 (a
model of 2 layers gets K = 1). A budget below about K/L is out of reach (`reachable` is
False): one token is kept after layer K and the recorded `tokens_layer_avg` shows the true
count. Passing `R` (fraction of image tokens dropped, the official `reduction_ratio`)
overrides the mapping; the budget is then not used.

Deviations from the official code:
- the kept count is exactly k: min(pivot_image, k) image pivots, then the other k - pivots
  tokens split over the pivots as evenly as possible (the first pivots take one more). The
  official code gives every pivot floor(M / pivots) tokens on top of the image pivots, so
  it keeps up to pivot_image more than its nominal M (132 for M = 128);
- pivots are processed in sequence order; the official code iterates a Python set of
  indices (hash order);
- fewer text tokens than `pivot_text` (or none) means fewer text pivots;
- ties (equal norms, equal similarities) go to the lower index (methods.topk_sorted);
- where the adapter's LLM has no final norm (`adapter.lm.norm`), the raw hidden states are
  compared.

Parameters: K (int, 1 <= K < L; None = the official 2), R (float in [0, 1); None = from
rho), pivot_image (int >= 1; official 4), pivot_text (int >= 0; official 4).
"""

from __future__ import annotations

import torch

from baselines.fastv import KeepAfterLayer
from gripbench.errors import GripbenchError
from gripbench.methods import PrunePoint, Selection, method_label, topk_sorted


def pivot_quotas(rest: int, pivots: int) -> list[int]:
    """`rest` tokens split over `pivots` pivots as evenly as possible, the first ones taking one more."""
    share, extra = divmod(rest, pivots)
    return [share + (i < extra) for i in range(pivots)]


def dart_keep(key_norms: torch.Tensor, hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, keep: int,
              pivot_image: int = 4, pivot_text: int = 4) -> torch.Tensor:
    """The DART rule for one row: positions into `visual` (ascending) of the `keep` image tokens
    kept. `key_norms` [T] are the L1 norms of the tokens' key states, `hidden` [T, D] the
    (final-normed) hidden states, `visual` [n] the slots of the image tokens, `text` [m] the
    slots of the text tokens that may be pivots."""
    n = visual.numel()
    image_pivots = topk_sorted(key_norms[visual].float(), min(pivot_image, keep, n))  # positions into `visual`
    text_pivots = text[topk_sorted(key_norms[text].float(), min(pivot_text, text.numel()))]  # slots
    pivots = sorted([int(visual[i]) for i in image_pivots] + text_pivots.tolist())  # sequence order
    chosen = torch.zeros(n, dtype=torch.bool, device=visual.device)
    chosen[image_pivots] = True
    h = torch.nn.functional.normalize(hidden.float(), dim=-1)
    candidates = h[visual]  # [n, D]
    for slot, quota in zip(pivots, pivot_quotas(keep - len(image_pivots), len(pivots))):
        if quota == 0:
            continue
        dissimilarity = -(candidates @ h[slot])  # negative cosine similarity to the pivot
        picked = topk_sorted(dissimilarity.masked_fill(chosen, float("-inf")), quota)
        chosen[picked] = True
    return chosen.nonzero()[:, 0]


class DART(KeepAfterLayer):
    """keep the image tokens least similar to a few key-norm pivots after layer K (layer-avg = rho)"""

    name = "dart"

    pivot_image: int = 4  # image pivots (largest key L1 norm); official 4
    pivot_text: int = 4  # text pivots from the question after the image; official 4

    def validate(self) -> None:
        super().validate()
        label = method_label(self)
        if self.pivot_image < 1:
            raise GripbenchError(f"parameter pivot_image of {label} must be at least 1, not {self.pivot_image}")
        if self.pivot_text < 0:
            raise GripbenchError(f"parameter pivot_text of {label} must be at least 0, not {self.pivot_text}")

    def selection_flops(self, info, text_tokens, arch=None):
        """Layer K-1's keys for every token (and their L1 norms), then one cosine row per pivot
        over the image tokens (2 x MACs)."""
        points = self.plan(info)
        if not points:
            return 0.0
        n = info.num_visual_tokens
        t = text_tokens + n
        kv = arch.kv_heads * arch.head_dim
        pivots = self.pivot_image + min(self.pivot_text, text_tokens)
        return 2.0 * (t * arch.dim * kv + t * kv + pivots * n * arch.dim)

    def select(self, ctx, point: PrunePoint) -> Selection:
        b, t = ctx.key_mask.shape
        last = torch.full((b, 1), t - 1, dtype=torch.long, device=ctx.key_mask.device)
        _, keys, _ = ctx.adapter.query_key(point.layer - 1, ctx.prev_hidden, last, ctx.positions)  # [B, KV, T, hd]
        norms = keys.float().abs().sum(dim=(1, 3))  # [B, T] L1 norm over all heads
        norm = getattr(getattr(ctx.adapter, "lm", None), "norm", None)
        hidden = ctx.hidden if norm is None else norm(ctx.hidden)
        text = ctx.question_mask()
        local = torch.stack([dart_keep(norms[i], hidden[i], ctx.visual_slots[i], text[i].nonzero()[:, 0], point.keep,
                                       self.pivot_image, self.pivot_text) for i in range(b)])
        return Selection(ctx.visual_ids.gather(1, local), scores=norms.gather(1, ctx.visual_slots))
