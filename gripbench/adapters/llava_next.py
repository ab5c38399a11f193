"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`) and LLaVA-OneVision
(`LlavaOnevisionForConditionalGeneration`), images only (one image per row).

Both cut an image into anyres tiles: the whole image resized to one tile (the *base* tile,
tile 0) and the crops of the image resized and padded to the best grid pinpoint (tiles
1.., in the stock raster order). The vision tower (CLIP with a [CLS] per tile, or SigLIP
without one) and the MLP projector run on every tile; the stock `pack_image_features` then
lays out, per image:

- the base tile's g x g tokens, in raster order;
- the crops' tokens as one map of (tile rows * g) x (tile cols * g) cells, with the rows or
  columns that only cover the padding cut away (`unpad_image`); OneVision then shrinks a map
  larger than `anyres_max_M` allows (more than 1.1 x sqrt(M) tiles' worth of tokens per side
  on average) with a bilinear `interpolate` of the projector outputs;
- an image-newline vector (a learned parameter, already in the LLM's space) after every
  map row. These tokens carry no patch: they are `prunable=False`, never shown to methods,
  always kept and counted.

The features given to the engine are the stock `get_image_features` outputs themselves (the
same call the stock forward makes, on the whole batch), so `none` is the stock model. The
per-token layout is derived from the stock shape arithmetic (`get_anyres_image_grid_shape`,
`image_size_to_num_patches`, `unpad_image` of the model's own module), and every per-tile
signal (features before the projector, vision attention, keys) is packed the same way
(`_pack`), the interpolation included. `VisualLayout` of a row: `tile` 0 for the base grid
and 1.. for the crop a map token comes from (for an interpolated map: the crop of the
nearest source cell), `y`/`x` the cell in its grid (base: in the tile; map: in the
unpadded, possibly interpolated map), and for newline tokens `tile` -1, `y` the map row
they end and `x` the map's width. `grids` = ((g, g), (map rows, map cols)).

What each signal is at a newline slot and on an interpolated map:

- `pre_projector`: the selected tower features (before the projector), zeros at newline
  slots; None for a row whose map was interpolated: no per-token vector there is mapped
  by the projector to the LLM's input (the projector is not linear), so methods that merge
  before the projector merge the projector outputs instead (VisionZip does);
- `vision_attention`: per tile, the [CLS] row of the tile's own attention at the feature
  layer (SigLIP: the mean attention each token receives within its tile), averaged keys
  likewise, packed like the features (an interpolated map gets the same bilinear
  interpolation of the attention and the keys); zeros at newline slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import import_module

import torch
import torch.nn.functional as F

from gripbench.adapters.base import Adapter, VisionOutput, VisualLayout
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo


@dataclass(frozen=True)
class Geometry:
    """The anyres layout of one image, from the stock shape arithmetic."""

    size: tuple[int, int]      # the image (height, width), as the processor reports it
    tiles: tuple[int, int]     # crop grid (rows, cols)
    g: int                     # tokens per tile side
    top: int                   # the unpadded map inside the padded (rows*g) x (cols*g) map
    left: int
    h: int
    w: int
    out: tuple[int, int]       # the map as the LLM sees it (after OneVision's interpolation)

    @property
    def n_tiles(self) -> int:
        """Tiles the tower runs on: the base tile and every crop."""
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def interpolated(self) -> bool:
        return self.out != (self.h, self.w)

    @property
    def n_tokens(self) -> int:
        return self.g * self.g + self.out[0] * (self.out[1] + 1)

    def map_sources(self) -> torch.Tensor:
        """[h, w] index into the crops' tokens flattened (crop-major, then raster in the
        crop) of each cell of the unpadded map, before any interpolation."""
        g, cols = self.g, self.tiles[1]
        pi = torch.arange(self.h)[:, None] + self.top
        pj = torch.arange(self.w)[None, :] + self.left
        crop = (pi // g) * cols + pj // g
        return crop * g * g + (pi % g) * g + pj % g

    def layout(self) -> VisualLayout:
        g, (h2, w2) = self.g, self.out
        base = VisualLayout.grid(g, g)
        src = self.map_sources()
        if self.interpolated:  # the crop of the nearest source cell (bilinear, align_corners=False)
            si = ((torch.arange(h2) + 0.5) * (self.h / h2)).floor().long().clamp(max=self.h - 1)
            sj = ((torch.arange(w2) + 0.5) * (self.w / w2)).floor().long().clamp(max=self.w - 1)
            src = src[si][:, sj]
        tile = torch.cat([1 + src // (g * g), torch.full((h2, 1), -1)], dim=1).flatten()
        ys = torch.arange(h2).repeat_interleave(w2 + 1)
        xs = torch.arange(w2 + 1).repeat(h2)
        prunable = xs < w2
        n = tile.numel()
        return VisualLayout(torch.zeros(g * g + n, dtype=torch.long), torch.cat([base.tile, tile]),
                            torch.cat([base.y, ys]), torch.cat([base.x, xs]),
                            torch.cat([base.prunable, prunable]), ((g, g), (h2, w2)))


@dataclass
class _Tiles:
    """A row's per-tile tower state (kept out of `extras` tensors: rows that share a layout
    may still differ in their tile count, and `VisionOutput.cat` stacks tensor extras)."""

    geometry: Geometry
    attn_input: torch.Tensor | None  # [tiles, T, Dv] input of the feature layer's attention


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: anyres tiles, unpadded map, image-newline tokens."""

    family = "llava-next"

    def __init__(self, model):
        super().__init__(model)
        inner = model.model
        self.inner = inner
        self.stock = import_module(type(inner).__module__)  # the family's own shape helpers
        self.vision_tower = inner.vision_tower
        self.tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        self.projector = inner.multi_modal_projector
        self.lm = inner.language_model
        self.lm_head = model.lm_head
        self.image_token_id = self.config.image_token_id
        vcfg = self.config.vision_config
        self.tile_px = vcfg.image_size
        self.g = vcfg.image_size // vcfg.patch_size
        self.pinpoints = self.config.image_grid_pinpoints
        self.feature_layer = self.config.vision_feature_layer
        self.strategy = self.config.vision_feature_select_strategy
        self.has_cls = hasattr(self.tower.embeddings, "class_embedding")
        if self.has_cls != (self.strategy == "default"):
            # the stock packing views each tile as g x g tokens: only these two pairings run
            raise GripbenchError(f"{type(model).__name__} with a {'[CLS]' if self.has_cls else 'no-[CLS]'} tower and "
                                 f"vision_feature_select_strategy={self.strategy!r} is not supported (the stock anyres "
                                 "packing needs g*g tokens per tile)")
        self.layers_selected = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        self.hidden_count = len(self.tower.encoder.layers) + 1  # hidden_states[i] is the output of encoder layer i-1
        self.attn_layer = max(layer % self.hidden_count for layer in self.layers_selected)

    # ---- geometry -----------------------------------------------------------------------
    def _interp_size(self, h: int, w: int) -> tuple[int, int]:
        return h, w  # LLaVA-NeXT keeps the unpadded map as it is

    def geometry(self, image_size) -> Geometry:
        size = [int(v) for v in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size)]
        rows, cols = self.stock.get_anyres_image_grid_shape(size, self.pinpoints, self.tile_px)
        n = self.stock.image_size_to_num_patches(size, self.pinpoints, self.tile_px)
        if n != 1 + rows * cols:
            raise GripbenchError(f"anyres arithmetic disagrees for image size {size}: {n} tiles, grid {rows} x {cols}")
        g = self.g
        full_w = cols * g
        index = torch.arange(rows * g * full_w).view(1, rows * g, full_w)
        kept = self.stock.unpad_image(index, size)  # the stock slicing, on cell indices
        h, w = kept.shape[1:]
        top, left = divmod(int(kept[0, 0, 0]), full_w)
        return Geometry(tuple(size), (rows, cols), g, top, left, h, w, self._interp_size(h, w))

    def _pack(self, per_tile: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """[tiles, g*g, C] per-tile vectors -> [N, C] in the stock packed order: the base tile,
        then the unpadded (interpolated) map row by row with zeros at the newline slots."""
        c = per_tile.shape[-1]
        crops = per_tile[1:].reshape(-1, c)
        grid = crops[geo.map_sources().to(per_tile.device)]  # [h, w, C]
        if geo.interpolated:  # the stock call, on the stock [C, h, w] layout
            grid = F.interpolate(grid.permute(2, 0, 1).contiguous()[None], list(geo.out), mode="bilinear")[0]
            grid = grid.permute(1, 2, 0)
        grid = torch.cat([grid, grid.new_zeros(geo.out[0], 1, c)], dim=1)
        return torch.cat([per_tile[0], grid.reshape(-1, c)])

    # ---- inputs -------------------------------------------------------------------------
    def _tile_counts(self, batch: dict) -> list[int]:
        bni = batch.get("batch_num_images")
        if bni is not None and any(int(n) != 1 for n in bni):
            raise GripbenchError(f"{self.family}: one image per row is supported (batch_num_images={bni.tolist()})")
        return [self.geometry(s).n_tiles for s in batch["image_sizes"]]

    def pixel_rows(self, batch: dict) -> list[torch.Tensor]:
        """Each row's own tiles (the processor pads pixel_values to the batch's largest tile count)."""
        return [px[:n] for px, n in zip(batch["pixel_values"], self._tile_counts(batch))]

    # ---- vision -------------------------------------------------------------------------
    def _image_features(self, pixel_values, image_sizes, batch: dict):
        return self.inner.get_image_features(pixel_values, image_sizes, output_hidden_states=True, return_dict=True)

    @torch.no_grad()
    def vision(self, batch: dict) -> list[VisionOutput]:
        """The stock `get_image_features` on the whole batch (the stock forward's call), one
        VisionOutput per row with the packed features, their layout, the packed features
        before the projector and the feature layer's attention input per tile."""
        pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
        if pixel_values.dim() != 5:
            raise GripbenchError(f"{self.family}: expected pixel_values [B, tiles, C, H, W], got {tuple(pixel_values.shape)}")
        counts = self._tile_counts(batch)
        dtype = getattr(self.vision_tower, "dtype", pixel_values.dtype)
        out = self._image_features(pixel_values.to(dtype), image_sizes, batch)
        hs = out.hidden_states
        pool = [hs[i] for i in self.layers_selected]
        selected = pool[0] if len(pool) == 1 else torch.cat(pool, dim=-1)
        if self.strategy == "default":
            selected = selected[:, 1:]
        attn_input = hs[self.attn_layer - 1] if self.attn_layer >= 1 else None
        rows, start = [], 0
        for r, n in enumerate(counts):
            geo = self.geometry(image_sizes[r])
            feats = out.pooler_output[r]
            if feats.shape[0] != geo.n_tokens:
                raise GripbenchError(f"row {r}: the stock packing gave {feats.shape[0]} tokens, the layout {geo.n_tokens}")
            pre = None if geo.interpolated else self._pack(selected[start:start + n], geo)[None]
            tiles = _Tiles(geo, None if attn_input is None else attn_input[start:start + n])
            rows.append(VisionOutput(feats[None], geo.layout(), pre, {"tiles": tiles}))
            start += n
        return rows

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.projector(vision_features)

    @torch.no_grad()
    def vision_attention(self, vo: VisionOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, H, N] attention, [1, N, Dk] keys averaged over heads) over all N tokens of the
        row: per tile, the [CLS] row at the feature layer (no [CLS]: the mean attention each
        token receives within its tile), packed like the features (interpolated with them on
        OneVision's shrunk maps); zeros at newline slots. Recomputed from the layer's q/k."""
        if vo._attention is not None:
            return vo._attention
        tiles = vo.extras.get("tiles")
        if tiles is None or tiles.attn_input is None:
            raise GripbenchError("this vision tower exposes no attention at its feature layer")
        layer = self.tower.encoder.layers[self.attn_layer - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(tiles.attn_input)
        b, t, _ = x.shape
        k = attn.k_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        xq = x[:, :1] if self.has_cls else x
        q = attn.q_proj(xq).view(b, xq.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)
        row = probs[:, :, 0, :] if self.has_cls else probs.mean(dim=2)  # [tiles, H, T]
        if self.strategy == "default":  # the [CLS] is not among the LLM's tokens
            row, k = row[..., 1:], k[:, :, 1:]
        keys = k.mean(dim=1)  # [tiles, g*g, Dk]
        heads = row.shape[1]
        packed = self._pack(torch.cat([row.transpose(1, 2).to(keys.dtype), keys], dim=-1), tiles.geometry)
        vo._attention = (packed[:, :heads].T[None].float(), packed[:, heads:][None])
        return vo._attention

    def info(self) -> ModelInfo:
        """The default image: one square image of the tile size (its anyres layout)."""
        lay = self.geometry((self.tile_px, self.tile_px)).layout()
        return ModelInfo(num_visual_tokens=lay.key()[0], num_layers=len(self.layers), hidden_size=self.hidden_size,
                         grid=None, grids=lay.grids)

    # ---- cost ---------------------------------------------------------------------------
    def tower_macs(self) -> int:
        """One tile through the tower (MACs): patch embedding, every encoder layer (the stock
        forward runs them all, whatever the feature layer) on g*g patches plus the [CLS] where
        there is one, and SigLIP's attention-pooling head where it runs (`vision_use_head`)."""
        v = self.config.vision_config
        d, mlp, p = v.hidden_size, v.intermediate_size, v.patch_size
        n = self.g * self.g
        t = n + int(self.has_cls)
        per_layer = 4 * t * d * d + 2 * t * t * d + 2 * t * d * mlp  # q/k/v/o, scores and values, fc1/fc2
        macs = n * getattr(v, "num_channels", 3) * p * p * d + len(self.tower.encoder.layers) * per_layer
        if getattr(self.tower, "head", None) is not None and getattr(self.tower, "use_head", True):
            # one probe query: its projection (D^2), keys and values (2 T D^2), scores and
            # values (2 T D), the output projection (D^2), the MLP (2 D I)
            macs += 2 * d * d + 2 * t * d * d + 2 * t * d + 2 * d * mlp
        return macs

    def projector_tokens_per_tile(self) -> int:
        return self.g * self.g  # the stock projector runs on every tile's selected tokens, before unpadding

    def vision_flops(self, vo: VisionOutput) -> float:
        """FLOPs (2 x MACs) of the tower on every tile of the row and the projector on every
        tile's tokens (before unpadding, as the stock model runs it); the newline vectors
        and OneVision's interpolation are not matmuls and are not counted."""
        v, d = self.config.vision_config, self.hidden_size
        n = vo.extras["tiles"].geometry.n_tiles
        proj = self.projector
        d_in = proj.linear_1.in_features if hasattr(proj, "linear_1") else v.hidden_size * len(self.layers_selected)
        per_token = d_in * d + d * d
        return float(2 * n * (self.tower_macs() + self.projector_tokens_per_tile() * per_token))


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (images): LLaVA-NeXT's packing plus the `anyres_max_M` shrink of
    large maps (bilinear interpolation of the projector outputs)."""

    family = "llava-onevision"

    def __init__(self, model):
        super().__init__(model)
        self.aspect = self.config.vision_aspect_ratio

    def _interp_size(self, h: int, w: int) -> tuple[int, int]:
        max_num_patches = int(self.aspect.strip("anyres_max_"))  # noqa: B005 (the stock expression, verbatim)
        ratio = math.sqrt(h * w / (max_num_patches * self.g ** 2))
        if ratio > 1.1:
            return int(h // ratio), int(w // ratio)
        return h, w

    def _image_features(self, pixel_values, image_sizes, batch: dict):
        return self.inner.get_image_features(pixel_values, image_sizes, batch_num_images=batch.get("batch_num_images"),
                                             output_hidden_states=True, return_dict=True)
