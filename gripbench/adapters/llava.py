"""LLaVA (`LlavaForConditionalGeneration`): a CLIP or SigLIP tower (or Pixtral, see
`gripbench.adapters.pixtral`), LLaVA's MLP projector, and a Llama / Mistral / Qwen2 / Phi-3 LLM.

Vision features are selected exactly as `LlavaModel.get_image_features` selects them: one
feature layer or several concatenated on the channel axis, with the `default` strategy
dropping the tower's first token and `full` keeping it. CLIP's first token is its [CLS];
SigLIP has none, so `default` on a SigLIP tower drops a patch, as the stock model does.

`LlavaAdapter(model)` is what `adapter_for` builds for every `LlavaForConditionalGeneration`;
for a Pixtral tower (`vision_config.model_type == "pixtral"`, as mistral-community/pixtral-12b)
it returns a `gripbench.adapters.pixtral.PixtralAdapter` (dynamic resolution), which keeps
this class's LLM side.

A row may hold several images (its image placeholders, in order, are filled by the images
in order, as the stock `masked_scatter` fills them); `prepare` gives one image per row.
"""

from __future__ import annotations

import functools
import math

import torch

from gripbench.adapters.base import Adapter, VisionOutput, VisualLayout
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def row_layout(parts: list[VisualLayout]) -> VisualLayout:
    """A row's layout from its images' layouts (a row without an image: no tokens)."""
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return VisualLayout(empty, empty, empty, empty, torch.zeros(0, dtype=torch.bool), ())
    return parts[0] if len(parts) == 1 else VisualLayout.concat(parts)


class LlavaAdapter(Adapter):
    """LLaVA-1.5-style models: one fixed-size image grid per image."""

    family = "llava"

    def __new__(cls, model):
        if cls is LlavaAdapter and getattr(model.config.vision_config, "model_type", "") == "pixtral":
            from gripbench.adapters.pixtral import PixtralAdapter

            return super().__new__(PixtralAdapter)  # Python then runs PixtralAdapter.__init__(model)
        return super().__new__(cls)

    def __init__(self, model):
        super().__init__(model)
        inner = model.model
        self.vision_tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.lm = inner.language_model
        self.lm_head = model.lm_head
        self.image_token_id = self.config.image_token_id
        self.feature_layer = self.config.vision_feature_layer
        self.feature_layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        self.strategy = self.config.vision_feature_select_strategy
        self._init_tower()

    def _init_tower(self) -> None:
        vcfg = self.config.vision_config
        size, patch = _pair(vcfg.image_size), _pair(vcfg.patch_size)
        self.grid_hw = (size[0] // patch[0], size[1] // patch[1])
        self.grid = self.grid_hw[0]  # the side of the (square) grid, for older callers
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # v4 wraps, v5 does not
        self.tower = tower
        # CLIP prepends a [CLS] token (its embeddings own a class_embedding); SigLIP does not
        self.has_cls = hasattr(tower.embeddings, "class_embedding")
        self.hidden_count = len(tower.encoder.layers) + 1  # hidden_states[i] is the output of encoder layer i-1
        # the attention signal is read at the deepest selected layer
        self.attn_layer = max(layer % self.hidden_count for layer in self.feature_layers)
        self.tower_tokens = self.grid_hw[0] * self.grid_hw[1] + (1 if self.has_cls else 0)
        self.tokens_out = self.tower_tokens - (1 if self.strategy == "default" else 0)

    def _layout(self) -> VisualLayout:
        gh, gw = self.grid_hw
        if self.has_cls and self.strategy != "default":  # [CLS] first, as a 1 x 1 grid of its own
            lay = VisualLayout.grid(gh, gw, extra_front=1)
            lay.grids = ((1, 1), (gh, gw))
            return lay
        if not self.has_cls and self.strategy == "default":  # stock drops SigLIP's first patch
            n = gh * gw - 1
            return VisualLayout(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                                torch.arange(1, gh * gw) // gw, torch.arange(1, gh * gw) % gw,
                                torch.ones(n, dtype=torch.bool), ())
        return VisualLayout.grid(gh, gw)

    def info(self) -> ModelInfo:
        lay = self._layout()
        return ModelInfo(num_visual_tokens=self.tokens_out, num_layers=len(self.layers), hidden_size=self.hidden_size,
                         grid=lay.grids[0] if len(lay.grids) == 1 else None, grids=lay.grids)

    # ---- inputs -------------------------------------------------------------------------
    def _image_tokens(self, batch: dict) -> list[int]:
        """The placeholder count of each image of the batch, in order."""
        return [self.tokens_out] * batch["pixel_values"].shape[0]

    def row_batch(self, batch: dict, i: int) -> dict:
        """Row i alone, without its left padding, with its own images (a row may hold several)."""
        out = super().row_batch(batch, i)
        images = self._images_per_row(batch, self._image_tokens(batch))[i]
        for key in ("pixel_values", "image_sizes"):
            if isinstance(batch.get(key), torch.Tensor):
                out[key] = batch[key][images]
        return out

    # ---- vision -------------------------------------------------------------------------
    def _images_per_row(self, batch: dict, tokens: list[int]) -> list[list[int]]:
        """Which images (indices into the batch's images, in order) fill each row: the images in
        order, each row taking as many as its placeholder count holds (`tokens[i]` placeholders
        for image i). Without input_ids, or when the counts do not fit, one image per row (the
        engine then names the mismatch)."""
        ids = batch.get("input_ids")
        if ids is None:
            return [[i] for i in range(len(tokens))]
        counts = (ids == self.image_token_id).sum(1).tolist()
        rows, i = [], 0
        for c in counts:
            row, got = [], 0
            while got < c and i < len(tokens):
                row.append(i)
                got += tokens[i]
                i += 1
            if got != c:
                return [[j] for j in range(len(tokens))]
            rows.append(row)
        return rows if i == len(tokens) else [[j] for j in range(len(tokens))]

    def _select_features(self, hs) -> torch.Tensor:
        """`get_image_features`' selection: one layer, or several concatenated on channels."""
        pool = [hs[i][:, 1:] if self.strategy == "default" else hs[i] for i in self.feature_layers]
        return pool[0] if len(pool) == 1 else torch.cat(pool, dim=-1)

    @torch.no_grad()
    def vision(self, batch: dict) -> list[VisionOutput]:
        """Projector outputs, exactly as `LlavaModel.get_image_features` computes them."""
        pixel_values = batch["pixel_values"]
        dtype = self.vision_tower.dtype if hasattr(self.vision_tower, "dtype") else pixel_values.dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        selected = self._select_features(hs)
        feats = self.projector(selected)
        attn_input = hs[self.attn_layer - 1] if self.attn_layer >= 1 else None
        # the [CLS] output the `default` strategy drops: VisionZip's official rule feeds it to the LLM
        cls = torch.cat([hs[i][:, :1] for i in self.feature_layers], -1) if self.has_cls and self.strategy == "default" else None
        layout = self._layout()
        rows = []
        for images in self._images_per_row(batch, self._image_tokens(batch)):
            pick = lambda t, ims=images: t[ims].reshape(1, -1, t.shape[-1])  # noqa: E731  [k, n, d] -> [1, k*n, d]
            extras = {} if attn_input is None else {"attn_input": pick(attn_input)}
            if cls is not None:
                extras["cls"] = pick(cls)  # [1, images, Dv]
            rows.append(VisionOutput(pick(feats), row_layout([layout] * len(images)), pick(selected), extras))
        return rows

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The projector on `pre_projector` vectors (methods that merge before it: VisionZip)."""
        return self.projector(vision_features)

    @torch.no_grad()
    def vision_attention(self, vo: VisionOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, H, N] attention to each visual token, [B, N, Dk] keys averaged over heads) at
        the (deepest) feature layer: the [CLS] row when the tower has a [CLS] (CLIP), else the
        mean attention each token receives (SigLIP), as VisionZip's and VisPruner's SigLIP
        ports do. Computed from the layer's own q/k, so the tower keeps running with SDPA.
        Each image of a row attends within itself (its own tower pass)."""
        if vo._attention is not None:
            return vo._attention
        if "attn_input" not in vo.extras:
            raise GripbenchError("this vision tower exposes no attention at its feature layer")
        layer = self.tower.encoder.layers[self.attn_layer - 1]
        attn = layer.self_attn
        x = vo.extras["attn_input"]
        b, t = x.shape[0], self.tower_tokens
        k_img = x.shape[1] // t
        x = layer.layer_norm1(x.reshape(b * k_img, t, -1))
        k = attn.k_proj(x).view(b * k_img, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        xq = x[:, :1] if self.has_cls else x  # only the [CLS] query row is needed when there is one
        q = attn.q_proj(xq).view(b * k_img, xq.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)
        row = probs[:, :, 0, :] if self.has_cls else probs.mean(dim=2)  # [B*k, H, t]
        keys = k.mean(dim=1)  # [B*k, t, hd]
        if self.strategy == "default":  # the tokens the LLM sees: the tower's first one is dropped
            row, keys = row[..., 1:], keys[:, 1:]
        n = row.shape[-1]
        row = row.reshape(b, k_img, -1, n).transpose(1, 2).reshape(b, -1, k_img * n)
        vo._attention = (row, keys.reshape(b, k_img * n, -1))
        return vo._attention

    # ---- LLM ----------------------------------------------------------------------------
    def _window(self, index: int) -> int | None:
        """Layer `index`'s sliding attention window (Mistral, Phi-3; Qwen2's `sliding_attention`
        layers), or None for full attention."""
        text = self.config.get_text_config()
        window = getattr(text, "sliding_window", None)
        types = getattr(text, "layer_types", None)
        if types is not None and index < len(types):
            return window if types[index] == "sliding_attention" else None
        return window

    @functools.cached_property
    def _smallest_window(self) -> float:
        """The shortest sliding window of any layer (inf without one): fixed by the config."""
        return min((w for i in range(len(self.layers)) if (w := self._window(i)) is not None), default=math.inf)

    def needs_mask(self, keys: int) -> bool:
        return keys > self._smallest_window

    def run_layer(self, index: int, h, mask, positions, cos_sin, cache):
        """The stock layer, with the sliding window the stock model's mask applies where the
        layer has one (query slot i sees key slot j only if i - j < window; slots count left
        padding, as the stock cache positions do). The eager/SDPA kernels ignore the layer's
        own `sliding_window`: the mask is what enforces it."""
        window = self._window(index)
        if window is not None and mask is not None and mask.shape[-1] > window:
            k, q = mask.shape[-1], mask.shape[-2]
            qi = torch.arange(k - q, k, device=mask.device)
            far = (qi[:, None] - torch.arange(k, device=mask.device)[None, :]) >= window
            mask = mask.masked_fill(far, torch.finfo(mask.dtype).min)
        return super().run_layer(index, h, mask, positions, cos_sin, cache)

    def _rope(self, q, k, query_cos_sin, key_cos_sin):
        """Partial rotary (Phi-3 with partial_rotary_factor < 1, as its apply_rotary_pos_emb):
        only the first cos.shape[-1] dims of each head rotate."""
        r = query_cos_sin[0].shape[-1]
        if r == q.shape[-1]:
            return super()._rope(q, k, query_cos_sin, key_cos_sin)
        qr, kr = super()._rope(q[..., :r], k[..., :r], query_cos_sin, key_cos_sin)
        return torch.cat([qr, q[..., r:]], dim=-1), torch.cat([kr, k[..., r:]], dim=-1)

    # ---- cost ---------------------------------------------------------------------------
    def projector_macs_per_token(self) -> int:
        """The projector's Linear layers, counted from the modules themselves."""
        return sum(m.in_features * m.out_features for m in self.projector.modules() if isinstance(m, torch.nn.Linear))

    def vision_arch(self):
        from dataclasses import replace

        return replace(self.llm_arch(), vision_cls=self.has_cls)

    def vision_flops(self, vo: VisionOutput) -> float:
        """The row's images through the tower (every layer the stock forward runs) and the
        projector on the tokens it projects (2 x MACs)."""
        from gripbench.flops import vision_macs

        images = int(vo.layout.image.max()) + 1 if vo.layout.size else 0  # a row's images are numbered 0..k-1
        per_image = vision_macs(self.vision_arch()) + self.tokens_out * self.projector_macs_per_token()
        return float(2 * images * per_image)
