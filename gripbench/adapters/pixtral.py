"""LLaVA with a Pixtral tower (`LlavaForConditionalGeneration` + `PixtralVisionConfig`, as
mistral-community/pixtral-12b): dynamic resolution.

The stock model pads a batch's images to one size (`pixel_values` [I, 3, Hmax, Wmax]) with
their real sizes in `image_sizes`; the tower cuts each image's patch grid
(size // patch_size), flattens every image of the batch into one sequence with a
block-diagonal attention mask and 2-D RoPE positions (row, column) per image, and
`get_image_features` splits the projected features back per image. The prompt holds, per
image, rows of [IMG] tokens each closed by [IMG_BREAK], the last by [IMG_END]: only [IMG] are
image placeholders; the break/end tokens are ordinary text tokens, never pruned.

Here each image runs through the tower alone, cropped to its real size: the same numbers
(attention is block-diagonal and every other op is per patch), a row's result independent of
the batch it sits in, and a cost that is that of its own patches (no padding, no cross-image
attention square). Rows may carry different visual-token counts (the engine's ragged batches).
Each image is a `VisualLayout.grid(h, w)`; the features are selected with the `full` strategy
(Pixtral has no [CLS]; the stock `default` would drop the first patch of the whole flattened
batch, which no checkpoint uses, so it is refused).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from gripbench.adapters.base import VisionOutput, VisualLayout
from gripbench.adapters.llava import LlavaAdapter, row_layout
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo


class PixtralAdapter(LlavaAdapter):
    """Pixtral tower, LLaVA projector, Mistral (or any Llama-style) LLM."""

    family = "llava"

    def _init_tower(self) -> None:
        if self.strategy != "full":
            raise GripbenchError(f"a Pixtral tower with vision_feature_select_strategy={self.strategy!r} is not supported "
                                 "(Pixtral checkpoints use 'full': the tower has no [CLS] to drop)")
        self.tower = self.vision_tower
        self.patch = int(self.tower.patch_size)
        self.has_cls = False
        self.hidden_count = len(self.tower.transformer.layers) + 1
        self.attn_layer = max(layer % self.hidden_count for layer in self.feature_layers)

    def prepare(self, processor, images: list, questions: list[str]) -> dict:
        """The base prompt; also learns [IMG_BREAK] / [IMG_END] from the processor (the config
        does not name them), so methods do not read them as question text."""
        tok = processor.tokenizer
        self.structure_token_ids = tuple(tok.convert_tokens_to_ids(t) for t in
                                         (getattr(processor, "image_break_token", None), getattr(processor, "image_end_token", None))
                                         if t is not None)
        return super().prepare(processor, images, questions)

    def info(self) -> ModelInfo:
        """Dynamic resolution: no default token count or grid (each group's layout says)."""
        return ModelInfo(num_visual_tokens=0, num_layers=len(self.layers), hidden_size=self.hidden_size, grid=None,
                         grids=())

    # ---- inputs -------------------------------------------------------------------------
    def _grids(self, batch: dict) -> list[tuple[int, int]]:
        """Each image's patch grid (rows, cols) from its real size."""
        pv = batch["pixel_values"]
        sizes = batch.get("image_sizes")
        if sizes is None:
            sizes = [pv.shape[-2:]] * pv.shape[0]
        return [(int(h) // self.patch, int(w) // self.patch) for h, w in (s.tolist() if torch.is_tensor(s) else s
                                                                         for s in sizes)]

    def _crop(self, batch: dict, i: int, grid: tuple[int, int]) -> torch.Tensor:
        """Image i's pixels without the batch padding: [3, h * patch, w * patch]."""
        return batch["pixel_values"][i, :, : grid[0] * self.patch, : grid[1] * self.patch]

    def _image_tokens(self, batch: dict) -> list[int]:
        return [h * w for h, w in self._grids(batch)]

    def row_batch(self, batch: dict, i: int) -> dict:
        """Row i alone, as the processor gives it: its images padded to their own largest size,
        not the batch's."""
        out = super().row_batch(batch, i)
        if len(out["image_sizes"]):
            h, w = (int(v) for v in out["image_sizes"].max(dim=0).values)
            out["pixel_values"] = out["pixel_values"][..., :h, :w]
        return out

    def pixel_rows(self, batch: dict) -> list[torch.Tensor]:
        """Each row's pixels cropped to its images' real sizes (padding depends on the batch)."""
        grids = self._grids(batch)
        rows = self._images_per_row(batch, [h * w for h, w in grids])
        return [torch.cat([self._crop(batch, i, grids[i]).flatten() for i in images]) if images
                else batch["pixel_values"].new_zeros(0) for images in rows]

    # ---- vision -------------------------------------------------------------------------
    @torch.no_grad()
    def vision(self, batch: dict) -> list[VisionOutput]:
        """Projector outputs per row, the numbers of `LlavaModel.get_image_features` (each image
        through the tower alone, cropped to its real size)."""
        grids = self._grids(batch)
        dtype = self.tower.dtype if hasattr(self.tower, "dtype") else batch["pixel_values"].dtype
        per_image = []
        for i, (gh, gw) in enumerate(grids):
            px = self._crop(batch, i, (gh, gw))[None].to(dtype)
            size = torch.tensor([[gh * self.patch, gw * self.patch]], device=px.device)
            hs = self.tower(px, image_sizes=size, output_hidden_states=True, return_dict=True).hidden_states
            selected = self._select_features(hs)  # [1, h*w, Dv * layers]
            per_image.append((self.projector(selected), selected, hs[self.attn_layer - 1]))
        rows = []
        for images in self._images_per_row(batch, self._image_tokens(batch)):
            layout = row_layout([VisualLayout.grid(*grids[i]) for i in images])
            if not images:  # a row without an image
                rows.append(VisionOutput(batch["pixel_values"].new_zeros(1, 0, self.hidden_size), layout))
                continue
            cat = lambda j, ims=images: torch.cat([per_image[i][j] for i in ims], dim=1)  # noqa: E731
            rows.append(VisionOutput(cat(0), layout, cat(1), {"attn_input": cat(2)}))
        return rows

    @torch.no_grad()
    def vision_attention(self, vo: VisionOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, H, N] mean attention each token receives from the tokens of its own image,
        [B, N, Dk] keys averaged over heads) at the (deepest) feature layer: Pixtral has no
        [CLS]. From the layer's q/k after its RMSNorm and 2-D RoPE (the keys are the rotated
        ones the attention uses), as the stock PixtralAttention computes them."""
        if vo._attention is not None:
            return vo._attention
        layer = self.tower.transformer.layers[self.attn_layer - 1]
        attn = layer.attention
        x_all = vo.extras["attn_input"]
        b = x_all.shape[0]
        rows, keys, start = [], [], 0
        for gh, gw in vo.layout.grids:
            n = gh * gw
            x = layer.attention_norm(x_all[:, start:start + n])
            start += n
            q = attn.q_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
            ys, xs = torch.meshgrid(torch.arange(gh, device=x.device), torch.arange(gw, device=x.device), indexing="ij")
            cos, sin = self.tower.patch_positional_embedding(x, torch.stack([ys.flatten(), xs.flatten()], dim=-1))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # [n, hd] broadcast over B, H
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scaling, dim=-1)
            rows.append(probs.mean(dim=2))  # [B, H, n]
            keys.append(k.mean(dim=1))      # [B, n, hd]
        vo._attention = (torch.cat(rows, dim=-1), torch.cat(keys, dim=1))
        return vo._attention

    # ---- cost ---------------------------------------------------------------------------
    def vision_flops(self, vo: VisionOutput) -> float:
        """Each image of the row through the tower on its own patch grid (attention within the
        image: block-diagonal) and the projector on its tokens (2 x MACs)."""
        from gripbench.flops import vision_macs

        a, proj = self.vision_arch(), self.projector_macs_per_token()
        return float(2 * sum(vision_macs(a, h * w) + h * w * proj for h, w in vo.layout.grids))
