"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (`Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`).

Dynamic resolution: each image becomes a (h/2) x (w/2) grid of merged tokens (2 x 2 patches
each), so rows of a batch carry different visual-token counts; the engine groups rows by
layout. What is reproduced from the stock forward (transformers 5.24):

- vision: `model.model.get_image_features(pixel_values, image_grid_thw)`, the stock call, on
  the whole batch's images; its per-image merged tokens are assigned to rows in order (the
  image placeholders of each row tell how many). Qwen2.5-VL's windowed attention and its
  window permutation are the stock tower's own business. Qwen3-VL's DeepStack features
  ([L, N, D] per row) are kept in `extras["deepstack"]`;
- positions: the stock M-RoPE ids, `model.model.get_rope_index(...)` with the batch's
  `mm_token_type_ids`, `image_grid_thw` and `attention_mask` ([3, B, T], pads 0): what
  `forward` and `generate` compute for a left-padded batch. Decoding continues at the prompt's
  last position + 1 in all three components (generate's text position + rope delta);
- LLM: the stock rotary turns [3, B, T] ids into one cos/sin [B, T, hd] (it recomposes the
  M-RoPE sections itself: contiguous for Qwen2/2.5, interleaved for Qwen3), so the base
  Llama-style `query_key`/`attention` apply as they are (Qwen3's q/k norms included); the
  decoder layers get `position_ids=None`, as in the stock forward with 3-D ids (the ids only
  feed flash-attention packing, never used with the engine's explicit mask);
- DeepStack (`after_layer`): after decoder layer i < L, row r's DeepStack features of its
  still-present visual tokens are added at their slots, as `Qwen3VLTextModel._deepstack_process`
  adds them at the visual positions.
"""

from __future__ import annotations

import sys

import torch

from gripbench.adapters.base import Adapter, VisionOutput, VisualLayout
from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo


class QwenVLAdapter(Adapter):
    """Qwen2-VL (and the shared Qwen-VL machinery: dynamic-resolution merged grids, M-RoPE)."""

    family = "qwen2-vl"

    def __init__(self, model):
        super().__init__(model)
        inner = model.model
        self.visual = inner.visual
        self.lm = inner.language_model
        self.lm_head = model.lm_head
        self.image_token_id = self.config.image_token_id
        vc = self.config.vision_config
        self.vcfg = vc
        self.merge = vc.spatial_merge_size
        self.unit = self.merge ** 2

    # ---- inputs -------------------------------------------------------------------------
    def _image_rows(self, batch: dict) -> list[list[int]]:
        """The images of each row (indices into image_grid_thw), in order: a row takes images
        until their merged tokens fill its image placeholders."""
        grid = batch["image_grid_thw"]
        tokens = (grid.prod(-1) // self.unit).tolist()
        counts = (batch["input_ids"] == self.image_token_id).sum(1).tolist()
        rows, i = [], 0
        for r, c in enumerate(counts):
            mine, total = [], 0
            while total < c and i < len(tokens):
                mine.append(i)
                total += tokens[i]
                i += 1
            if total != c:
                raise ValueError(f"row {r} has {c} image placeholder tokens but its images give {total} visual tokens")
            rows.append(mine)
        if i != len(tokens):
            raise ValueError(f"{len(tokens) - i} image(s) of the batch have no placeholder tokens")
        return rows

    def _patch_offsets(self, batch: dict) -> list[int]:
        patches = batch["image_grid_thw"].prod(-1).tolist()
        out = [0]
        for p in patches:
            out.append(out[-1] + p)
        return out

    def pixel_rows(self, batch: dict) -> list[torch.Tensor]:
        """Each row's patches (t*h*w rows of the flattened pixel_values per image), so content
        seeds do not depend on the batch."""
        off = self._patch_offsets(batch)
        px = batch["pixel_values"]
        return [torch.cat([px[off[i]:off[i + 1]] for i in imgs]) if imgs else px[:0]
                for imgs in self._image_rows(batch)]

    def row_batch(self, batch: dict, i: int) -> dict:
        """Row i alone, without its left padding, with its own images' patches and grids."""
        out = super().row_batch(batch, i)
        imgs = self._image_rows(batch)[i]
        out["pixel_values"] = self.pixel_rows(batch)[i]
        out["image_grid_thw"] = batch["image_grid_thw"][imgs]
        return out

    # ---- vision -------------------------------------------------------------------------
    def _tower_call(self, pixel_values, grid):
        """The stock `get_image_features`, recording the last block's input, position
        embeddings and attention segments (for `vision_attention`)."""
        seen = {}

        def grab(module, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]
            seen["pe"] = kwargs.get("position_embeddings")
            seen["cu"] = kwargs.get("cu_seqlens")

        hook = self.visual.blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.model.model.get_image_features(pixel_values, grid, return_dict=True)
        finally:
            hook.remove()
        return out, seen

    def _unit_order(self, grid_row: torch.Tensor) -> torch.Tensor:
        """For the tower's sequence of merge units of one image: which merged token (raster
        order) each unit is. Identity, except for Qwen2.5-VL's window permutation."""
        n = int(grid_row.prod()) // self.unit
        return torch.arange(n)

    @torch.no_grad()
    def vision(self, batch: dict) -> list[VisionOutput]:
        grid = batch["image_grid_thw"]
        out, seen = self._tower_call(batch["pixel_values"], grid)
        feats = out.pooler_output  # tuple: one [N_i, D] per image
        deep = getattr(out, "deepstack_features", None)  # Qwen3-VL: list over L of tuples per image
        last = out.last_hidden_state  # [sum P, Dv], in the tower's (possibly window-permuted) order
        off = self._patch_offsets(batch)
        cu = seen["cu"].tolist()
        result = []
        for imgs in self._image_rows(batch):
            layouts, pre, attn_in, cos, sin, segs, orders, bounds = [], [], [], [], [], [0], [], [0]
            base_units = 0
            for i in imgs:
                t, h, w = grid[i].tolist()
                if t != 1:
                    raise GripbenchError(f"{self.family}: an image with {t} temporal patches (video frames) is not supported")
                layouts.append(VisualLayout.grid(h // self.merge, w // self.merge))
                order = self._unit_order(grid[i]).to(last.device)  # unit j of the tower is merged token order[j]
                inverse = torch.argsort(order)
                units = last[off[i]:off[i + 1]].reshape(-1, self.unit * last.shape[-1])
                pre.append(units[inverse])
                orders.append(order + base_units)
                base_units += len(order)
                attn_in.append(seen["h"][off[i]:off[i + 1]])
                cos.append(seen["pe"][0][off[i]:off[i + 1]])
                sin.append(seen["pe"][1][off[i]:off[i + 1]])
                start = bounds[-1]
                segs += [c - off[i] + start for c in cu if off[i] < c <= off[i + 1]]
                bounds.append(start + off[i + 1] - off[i])
            features = torch.cat([feats[i] for i in imgs])[None]
            extras = {"attn_input": torch.cat(attn_in)[None], "attn_cos": torch.cat(cos)[None],
                      "attn_sin": torch.cat(sin)[None], "attn_segments": torch.tensor(segs)[None],
                      "unit_order": torch.cat(orders)[None], "image_bounds": torch.tensor(bounds)[None],
                      "grid_thw": grid[imgs].cpu()[None]}
            if deep is not None:
                extras["deepstack"] = torch.stack([torch.cat([layer[i] for i in imgs]) for layer in deep])[None]
            layout = layouts[0] if len(layouts) == 1 else VisualLayout.concat(layouts)
            result.append(VisionOutput(features, layout, torch.cat(pre)[None], extras))
        return result

    def project(self, pre_projector: torch.Tensor) -> torch.Tensor:
        """The merger on pre-projector features [B, n, unit * Dv] (each merged token's 2 x 2
        patches, concatenated as the merger reads them) -> [B, n, D]."""
        b, n, _ = pre_projector.shape
        x = pre_projector.reshape(b * n * self.unit, -1)
        return self.visual.merger(x).view(b, n, -1)

    @torch.no_grad()
    def vision_attention(self, vo: VisionOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, H, N] attention each merged token receives, [1, N, Dk] keys) at the tower's
        last block, from that block's own q/k (the tower keeps running with SDPA).

        Qwen towers have no [CLS]: the signal is the mean attention a patch receives from the
        queries of its image (the image's attention matrix averaged over its query rows; a
        windowed block's matrix is block-diagonal over its windows, so a patch receives nothing
        from outside its window), then averaged over the merged token's 2 x 2 patches. This is
        the mean-received choice gripbench makes for towers without [CLS] (the LLaVA adapter's
        SigLIP path); public Qwen2-VL ports of such methods differ (FlowCut scores patches by
        the attention of the mean query; an unofficial VisionZip port treats patch 0 as [CLS]),
        and none is official. Keys are the block's keys after its 2-D rotary embedding, as the
        block's attention compares them, averaged over heads and over the 2 x 2 patches.
        Tokens come in the merged tokens' raster order (Qwen2.5-VL's window permutation undone)."""
        if vo._attention is not None:
            return vo._attention
        rows, keys = [], []
        block = self.visual.blocks[-1]
        attn = block.attn
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        for r in range(vo.features.shape[0]):
            x = block.norm1(vo.extras["attn_input"][r])
            p = x.shape[0]
            q, k, _ = attn.qkv(x).reshape(p, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = rope(q, k, vo.extras["attn_cos"][r], vo.extras["attn_sin"][r])  # [P, H, hd]
            q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, P, hd]
            received = torch.zeros(attn.num_heads, p, dtype=torch.float32, device=x.device)
            segs = vo.extras["attn_segments"][r].tolist()
            for a, b in zip(segs[:-1], segs[1:]):
                probs = torch.softmax((q[:, a:b] @ k[:, a:b].transpose(-1, -2)).float() * attn.scaling, dim=-1)
                received[:, a:b] = probs.sum(dim=1)
            bounds = vo.extras["image_bounds"][r].tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                received[:, a:b] /= b - a
            inverse = torch.argsort(vo.extras["unit_order"][r].to(x.device))
            rows.append(received.view(attn.num_heads, -1, self.unit).mean(-1)[:, inverse])
            keys.append(k.mean(0).view(-1, self.unit, k.shape[-1]).mean(1)[inverse])
        vo._attention = (torch.stack(rows), torch.stack(keys))
        return vo._attention

    def info(self) -> ModelInfo:
        """Dynamic resolution: no default token count or grid (rows plan with `group_info`)."""
        return ModelInfo(num_visual_tokens=0, num_layers=len(self.layers), hidden_size=self.hidden_size)

    # ---- LLM ----------------------------------------------------------------------------
    def positions(self, batch: dict) -> torch.Tensor:
        """[3, B, T] M-RoPE ids, exactly the stock `get_rope_index` (pads 0)."""
        types = batch.get("mm_token_type_ids")
        if types is None:  # older processors: image placeholders are type 1 (videos are not supported)
            types = (batch["input_ids"] == self.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=types,
                                                 image_grid_thw=batch.get("image_grid_thw"),
                                                 attention_mask=batch["attention_mask"])
        return pos

    def run_layer(self, index: int, h, mask, positions, cos_sin, cache):
        return self.layers[index](h, attention_mask=mask, position_ids=None, cache=cache, use_cache=True,
                                  position_embeddings=cos_sin)

    # ---- cost ---------------------------------------------------------------------------
    def llm_arch(self):
        """`Arch` of the decoder; `Arch.from_config` assumes a fixed-size CLIP/SigLIP tower
        (image_size, intermediate_size), so it is built here. The vision fields describe one
        tower block; `num_patches` is 0 (dynamic resolution: `vision_flops` counts each row)."""
        from gripbench.flops import Arch

        t = self.config.text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        dv = self._vision_dim()
        return Arch(patch=self.vcfg.patch_size, vision_dim=dv, vision_mlp=self._vision_mlp(),
                    vision_layers=self.vcfg.depth, vision_head_dim=dv // self.vcfg.num_heads, num_patches=0,
                    vision_cls=False, dim=t.hidden_size, mlp=t.intermediate_size, heads=t.num_attention_heads,
                    kv_heads=t.num_key_value_heads, head_dim=head_dim, layers=t.num_hidden_layers, vocab=t.vocab_size)

    def _vision_dim(self) -> int:
        return self.vcfg.embed_dim

    def _vision_mlp(self) -> int:
        return int(self.vcfg.embed_dim * self.vcfg.mlp_ratio)

    def _mlp_macs(self, p: int) -> int:
        """The tower MLP on p patches: fc1 and fc2."""
        return 2 * p * self._vision_dim() * self._vision_mlp()

    def _attention_macs(self, block: int, t: int, h: int, w: int) -> int:
        """Scores and values of one block on one image: full attention within each frame."""
        return t * 2 * (h * w) ** 2 * self._vision_dim()

    def _merger_macs(self, n: int) -> int:
        """The 2 x 2 merger MLP on n merged tokens (unit*Dv -> unit*Dv -> D)."""
        dm = self.unit * self._vision_dim()
        return n * (dm * dm + dm * self.config.text_config.hidden_size)

    def image_vision_macs(self, t: int, h: int, w: int) -> int:
        """Multiply-accumulates of the tower and merger on one image of t x h x w patches:
        the Conv3d patch embedding, every block's qkv/proj projections, attention and MLP,
        and the merger(s). Norms, activations, rotary and position interpolation are not
        counted (as in torch.utils.flop_counter)."""
        p, dv, vc = t * h * w, self._vision_dim(), self.vcfg
        macs = p * vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2 * dv
        for block in range(vc.depth):
            macs += 4 * p * dv * dv + self._attention_macs(block, t, h, w) + self._mlp_macs(p)
        return macs + self._merger_macs(p // self.unit)

    def vision_flops(self, vo: VisionOutput) -> float:
        """FLOPs (2 x MACs) of the tower and merger(s) on the row's images."""
        grid = vo.extras["grid_thw"][0].tolist()
        return float(2 * sum(self.image_vision_macs(t, h, w) for t, h, w in grid))


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: RMSNorm/SwiGLU tower with windowed attention except in `fullatt_block_indexes`."""

    family = "qwen2.5-vl"

    def _unit_order(self, grid_row: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(grid_row[None].cpu(), spatial_merge_size=self.merge,
                                           window_size=self.vcfg.window_size, patch_size=self.vcfg.patch_size)
        return index

    def _vision_dim(self) -> int:
        return self.vcfg.hidden_size

    def _vision_mlp(self) -> int:
        return self.vcfg.intermediate_size

    def _mlp_macs(self, p: int) -> int:
        return 3 * p * self._vision_dim() * self._vision_mlp()  # gate, up, down

    def _attention_macs(self, block: int, t: int, h: int, w: int) -> int:
        """Full blocks attend over each frame; the others within windows of `window_size`
        pixels (win x win merged tokens from the top-left; edge windows are smaller)."""
        if block in self.vcfg.fullatt_block_indexes:
            return super()._attention_macs(block, t, h, w)
        win = self.vcfg.window_size // self.merge // self.vcfg.patch_size
        hm, wm = h // self.merge, w // self.merge

        def squares(g: int) -> int:  # sum of the squared window extents along one axis
            return (g // win) * win * win + (g % win) ** 2

        return t * 2 * self.unit ** 2 * squares(hm) * squares(wm) * self._vision_dim()


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: learned interpolated position embeddings, DeepStack features added to the
    first L decoder layers' outputs, interleaved M-RoPE and q/k norms in the LLM."""

    family = "qwen3-vl"

    def _vision_dim(self) -> int:
        return self.vcfg.hidden_size

    def _vision_mlp(self) -> int:
        return self.vcfg.intermediate_size

    def _merger_macs(self, n: int) -> int:
        """The merger and one DeepStack merger per DeepStack layer (same shapes)."""
        return (1 + len(self.vcfg.deepstack_visual_indexes)) * super()._merger_macs(n)

    def after_layer(self, index, h, slots, ids, vision):
        """After decoder layer `index` < L: add each row's DeepStack features of its present
        visual tokens (`ids[r]`) at their slots (`slots[r]`), as the stock text model adds
        `deepstack_visual_embeds[index]` at the visual positions."""
        if not vision or index >= vision[0].extras["deepstack"].shape[1]:
            return h
        h = h.clone()
        for r, (s, i) in enumerate(zip(slots, ids)):
            if len(s):
                feats = vision[r].extras["deepstack"][0, index].to(h.device, h.dtype)
                h[r, s] = h[r, s] + feats[i.to(feats.device)]
        return h
