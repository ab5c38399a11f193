"""What a pruning method may look at, computed only when it asks (unused signals cost nothing).

Shapes: B rows (left-padded), T tokens currently in the sequence, n visual tokens
currently present, N visual tokens in the image, D hidden size, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gripbench.adapters import VisionView
from gripbench.methods import ModelInfo


@dataclass
class PruneContext:
    adapter: object
    info: ModelInfo
    layer: int                      # 0 = before the LLM; l > 0 = before LLM layer l
    hidden: torch.Tensor            # [B, T, D] input of `layer` (the merged embeddings when layer == 0)
    positions: torch.Tensor         # [..., B, T] position ids (original ones, gaps allowed)
    key_mask: torch.Tensor          # [B, T] bool: real (non-pad) tokens
    visual_slots: torch.Tensor      # [B, n] where the present visual tokens sit in the sequence
    visual_ids: torch.Tensor        # [B, n] their original visual indices (0..N-1), ascending
    input_ids: torch.Tensor         # [B, T] token ids (image placeholders at the visual slots)
    vision: VisionView              # the group's vision results, prunable tokens only
    prev_hidden: torch.Tensor | None = None  # input of layer - 1, for methods that score there
    row_seeds: list[int] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def visual_features(self) -> torch.Tensor:
        """[B, n, D] current vectors of the present visual tokens."""
        return torch.gather(self.hidden, 1, self.visual_slots[..., None].expand(-1, -1, self.hidden.shape[-1]))

    def projector_features(self) -> torch.Tensor:
        """[B, n, D] the projector outputs of the present visual tokens (before any LLM layer)."""
        f = self.vision.features
        return torch.gather(f, 1, self.visual_ids[..., None].expand(-1, -1, f.shape[-1]))

    def vision_features(self) -> torch.Tensor:
        """[B, n, Dv] the vision tower's features of the present visual tokens, before the projector."""
        f = self.vision.pre_projector
        return torch.gather(f, 1, self.visual_ids[..., None].expand(-1, -1, f.shape[-1]))

    def vision_attention(self) -> torch.Tensor:
        """[B, H, n] vision-tower attention ([CLS] row, or mean received) at the feature layer."""
        row, _ = self.vision.attention()
        return torch.gather(row, 2, self.visual_ids[:, None, :].expand(-1, row.shape[1], -1))

    def vision_keys(self) -> torch.Tensor:
        """[B, n, Dk] the feature layer's attention keys, averaged over heads."""
        _, keys = self.vision.attention()
        return torch.gather(keys, 1, self.visual_ids[..., None].expand(-1, -1, keys.shape[-1]))

    def text_mask(self) -> torch.Tensor:
        """[B, T] bool: real tokens that are not visual (image placeholders of any kind, the
        unprunable image-newline tokens included, and the adapter's structure tokens such as
        Pixtral's [IMG_BREAK] are not text)."""
        m = self.key_mask & (self.input_ids != self.adapter.image_token_id)
        for token in self.adapter.structure_token_ids:
            m &= self.input_ids != token
        return m

    def question_mask(self) -> torch.Tensor:
        """[B, T] bool: text tokens after the image (the question and the answer prompt)."""
        text = self.text_mask()
        image = self.key_mask & ~text
        last = torch.where(image, torch.arange(image.shape[1], device=image.device), -1).max(dim=1, keepdim=True).values
        return text & (torch.arange(image.shape[1], device=image.device)[None] > last)

    def question_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Tq, D] input embeddings of the question tokens, [B, Tq] bool mask), left-aligned."""
        if "question" not in self._cache:
            qm = self.question_mask()
            emb = self.adapter.embed(self.input_ids)
            counts = qm.sum(1)
            tq = int(counts.max())
            order = torch.argsort((~qm).int(), dim=1, stable=True)[:, :tq]
            out = torch.gather(emb, 1, order[..., None].expand(-1, -1, emb.shape[-1]))
            mask = torch.arange(tq, device=emb.device)[None] < counts[:, None]
            self._cache["question"] = (out * mask[..., None], mask)
        return self._cache["question"]

    def attention(self, queries: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """[B, H, Q, T] attention probabilities of `queries` ([B, Q] sequence slots) over all
        tokens at LLM layer `layer` (default: the current one; `self.layer - 1` uses the
        previous layer's input). Computed from that layer's q/k after RoPE, with the causal
        and padding masks, so the model itself keeps its fast attention kernel."""
        layer = self.layer if layer is None else layer
        h = self.hidden if layer == self.layer else self.prev_hidden
        if h is None or layer not in (self.layer, self.layer - 1) or layer >= self.info.num_layers:
            raise ValueError(f"attention is available at layers {self.layer - 1} and {self.layer} only")
        return self.adapter.attention(layer, h, queries, self.positions, self.key_mask)

    def generator(self, row: int) -> torch.Generator:
        """A CPU generator for one row, seeded from the method's seed and the row's content:
        reproducible, and independent of the batch the row happens to sit in."""
        g = torch.Generator()
        g.manual_seed(self.row_seeds[row])
        return g

