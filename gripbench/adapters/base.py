"""The model-adapter protocol: what the engine needs from one family of Hugging Face VLMs.

An adapter wraps a loaded stock model (`from_pretrained`) and provides:

- **inputs**: `prepare(processor, images, questions)` -> the processor's batch (chat template,
  left padding); `pixel_rows(batch)` -> each row's pixels (for content-derived seeds);
- **vision**: `vision(batch)` -> one `VisionOutput` per row: the projector outputs that
  replace the row's image placeholders, in sequence order, and their `VisualLayout` (which
  image, tile and grid cell each visual token is; which tokens are prunable). Rows may carry
  different numbers of visual tokens (dynamic resolution, anyres tiles);
- **vision signals** for methods that ask: `vision_attention(vo)` -> ([1, H, N] attention each
  token receives at the feature layer: the [CLS] row where the tower has a [CLS], else the mean
  attention received, [1, N, Dk] keys averaged over heads);
- **the LLM**: `embed`, `positions(batch)` ([B, T], or [3, B, T] for M-RoPE), `next_positions`,
  `rotary`, `run_layer` (one stock decoder layer with an explicit mask and the per-layer KV
  cache), `after_layer` (family additions between layers, e.g. Qwen3-VL's DeepStack features,
  given the visual tokens still present), `query_key` (a layer's q/k after its norm and
  position encoding, fused qkv included), `logits`;
- **cost**: `llm_arch()` (the decoder's dimensions for gripbench.flops) and
  `vision_flops(vo)` (the row's vision tower + projector FLOPs).

The engine never looks at a family's module names; methods never see the family at all:
they see a dense group of rows with the same prunable-token count and grids (`ModelInfo`).

Defaults here are the Llama-style decoder that LLaVA's LLMs (Llama, Mistral, Qwen2, Phi-3)
and the Qwen-VL text models share; families override what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.models.llama.modeling_llama import rotate_half  # the RoPE helper the Llama decoder itself uses

from gripbench.methods import ModelInfo


@dataclass
class VisualLayout:
    """Where each of a row's N visual tokens comes from (tensors [N], sequence order).

    `tile` is 0 for the base (whole) image or a single-grid image and t >= 1 for anyres tile
    t; `y`/`x` the cell in the token's grid; `prunable` is False for tokens the model inserts
    that carry no patch (LLaVA-NeXT/OneVision image-newline tokens): they are always kept and
    always counted. `grids` are (rows, cols) of each grid the *prunable* tokens form, in
    order; each grid's tokens are contiguous and in raster order among the prunable tokens.
    """

    image: torch.Tensor
    tile: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    prunable: torch.Tensor
    grids: tuple[tuple[int, int], ...] = ()

    @property
    def size(self) -> int:
        return int(self.prunable.numel())

    @staticmethod
    def grid(rows: int, cols: int, extra_front: int = 0) -> VisualLayout:
        """One image as one rows x cols grid, after `extra_front` prunable tokens with no cell
        (LLaVA's `full` strategy keeps the [CLS] token first: its cell is (-1, -1))."""
        ys = torch.arange(rows).repeat_interleave(cols)
        xs = torch.arange(cols).repeat(rows)
        if extra_front:
            ys = torch.cat([torch.full((extra_front,), -1), ys])
            xs = torch.cat([torch.full((extra_front,), -1), xs])
        n = ys.numel()
        grids = ((rows, cols),) if not extra_front else ()
        return VisualLayout(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), ys, xs,
                            torch.ones(n, dtype=torch.bool), grids)

    @staticmethod
    def concat(parts: list[VisualLayout]) -> VisualLayout:
        """Several images of one row, in sequence order (image index = part index)."""
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        image = torch.cat([torch.full_like(p.image, i) for i, p in enumerate(parts)])
        grids = tuple(g for p in parts for g in p.grids) if all(p.grids for p in parts) else ()
        return VisualLayout(image, cat("tile"), cat("y"), cat("x"), cat("prunable"), grids)

    def key(self) -> tuple:
        """Rows whose layouts share this key are selected together (same counts and grids)."""
        return int(self.prunable.sum()), self.grids


@dataclass
class VisionOutput:
    """Vision results for B rows that share one layout (one row, or a group of equal rows),
    computed once and reusable across methods and budgets.

    `features` [B, N, D] are the projector outputs that fill the image placeholders, in order.
    `pre_projector` [B, N, Dv] are the vision features before the projector where the family
    has one per token (None otherwise). `extras` holds family tensors with a leading row
    dimension (the feature layer's attention input, Qwen3-VL's DeepStack features, ...).
    """

    features: torch.Tensor
    layout: VisualLayout | None = None
    pre_projector: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    _attention: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def attn_input(self):  # the LLaVA adapter's name for its extra, kept for older callers
        return self.extras.get("attn_input")

    def select_rows(self, rows) -> VisionOutput:
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: t[rows.to(t.device)] if isinstance(t, torch.Tensor) else t  # noqa: E731
        out = VisionOutput(self.features[rows.to(self.features.device)], self.layout,
                           None if self.pre_projector is None else pick(self.pre_projector),
                           {k: pick(v) for k, v in self.extras.items()})
        if self._attention is not None:
            out._attention = (pick(self._attention[0]), pick(self._attention[1]))
        return out

    def rows(self) -> list[VisionOutput]:
        return [self.select_rows([i]) for i in range(self.features.shape[0])]

    @staticmethod
    def cat(parts: list[VisionOutput]) -> VisionOutput:
        """Rows with the same token count stacked (the caller groups rows by layout key)."""
        if len(parts) == 1:
            return parts[0]
        join = lambda ts: None if any(t is None for t in ts) else torch.cat(ts)  # noqa: E731
        # extras that differ in shape between rows of one layout (LLaVA-NeXT's per-tile state
        # when two images unpad to the same map) are dropped: adapters read them per row
        extras = {k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras
                  if all(isinstance(p.extras.get(k), torch.Tensor) for p in parts)
                  and len({tuple(p.extras[k].shape[1:]) for p in parts}) == 1}
        out = VisionOutput(torch.cat([p.features for p in parts]), parts[0].layout,
                           join([p.pre_projector for p in parts]), extras)
        if all(p._attention is not None for p in parts):
            out._attention = (torch.cat([p._attention[0] for p in parts]), torch.cat([p._attention[1] for p in parts]))
        return out


class VisionView:
    """What a method sees of the vision results of its group: the prunable tokens only, dense
    [b, P, ...]. For families without fixed tokens this is the rows' own tensors."""

    def __init__(self, adapter, rows: list[VisionOutput], index: torch.Tensor | None):
        self._adapter, self._rows, self._index = adapter, rows, index
        full = VisionOutput.cat(rows)
        self.layout = full.layout
        self.features = self._take(full.features, 1)
        self.pre_projector = None if full.pre_projector is None else self._take(full.pre_projector, 1)

    def _take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t if self._index is None else t.index_select(dim, self._index.to(t.device))

    def extra(self, name: str) -> torch.Tensor | None:
        """The rows' family tensor `name` stacked ([b, ...]), or None where a row lacks it
        (e.g. "cls": the LLaVA adapter's [CLS] outputs per image, [b, images, Dv], which the
        `default` strategy does not feed to the LLM)."""
        parts = [r.extras.get(name) for r in self._rows]
        if any(not isinstance(p, torch.Tensor) for p in parts) or len({p.shape[1:] for p in parts}) != 1:
            return None
        return torch.cat(parts)

    def attention(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([b, H, P] attention received, [b, P, Dk] keys) at the feature layer."""
        parts = [self._adapter.vision_attention(r) for r in self._rows]
        row = torch.cat([p[0] for p in parts])
        keys = torch.cat([p[1] for p in parts])
        return self._take(row, 2), self._take(keys, 1)


class Adapter:
    """Base adapter: a Llama-style decoder (what every supported family's LLM is). Subclasses
    set `family`, `lm`, `lm_head`, `image_token_id`, and implement `vision`, `info`,
    `vision_attention`, `vision_flops`; they override the rest where the family differs."""

    family = "base"
    # tokens the processor puts around image placeholders that are neither visual tokens nor
    # text (Pixtral's [IMG_BREAK] / [IMG_END]): excluded from the text a method reads
    structure_token_ids: tuple[int, ...] = ()

    def __init__(self, model):
        self.model = model
        self.config = model.config

    # ---- inputs -------------------------------------------------------------------------
    def prepare(self, processor, images: list, questions: list[str]) -> dict:
        """Chat-templated, left-padded processor inputs for one image + question per row."""
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
            for q in questions]
        return dict(processor(text=texts, images=images, padding=True, return_tensors="pt", padding_side="left"))

    def pixel_rows(self, batch: dict) -> list[torch.Tensor]:
        """Each row's pixel tensor (what content-derived seeds hash)."""
        return list(batch["pixel_values"])

    def row_batch(self, batch: dict, i: int) -> dict:
        """Row i of a processor batch alone, without its left padding: what the processor
        would give for that row by itself. Tensors with a leading row dimension are sliced;
        pixels that the processor packs for the whole batch (`image_grid_thw`: Qwen-VL) are
        cut at the row's patch count."""
        keep = batch["attention_mask"][i].bool()
        rows = batch["input_ids"].shape[0]
        out = {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep]}
        packed = "image_grid_thw" in batch
        if packed:
            sizes = batch["image_grid_thw"].prod(-1).tolist()
            start = sum(sizes[:i])
            out["pixel_values"] = batch["pixel_values"][start:start + sizes[i]]
            out["image_grid_thw"] = batch["image_grid_thw"][i:i + 1]
        for key, value in batch.items():
            if key in out or (packed and key in ("pixel_values", "image_grid_thw")):
                continue
            if isinstance(value, torch.Tensor) and value.shape[:2] == batch["input_ids"].shape:
                out[key] = value[i:i + 1, keep]  # aligned with the tokens (e.g. token type ids)
            elif isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
                out[key] = value[i:i + 1]
            else:
                out[key] = value
        return out

    # ---- vision -------------------------------------------------------------------------
    def vision(self, batch: dict) -> list[VisionOutput]:
        raise NotImplementedError

    def vision_attention(self, vo: VisionOutput) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The projector applied to `pre_projector` vectors (methods that merge vision
        features before it, as VisionZip does). Families whose `pre_projector` is None do not
        implement it; such methods merge projector outputs instead and say so."""
        raise NotImplementedError(f"{type(self).__name__} has no per-token projector input")

    def info(self) -> ModelInfo:
        """Model-level facts; `num_visual_tokens`/`grid` describe the default image (one image
        at the processor's default size) and are 0/None for dynamic-resolution families."""
        raise NotImplementedError

    def group_info(self, layout: VisualLayout) -> ModelInfo:
        """What a method's `plan` sees for a group of rows with this layout."""
        grids = layout.grids
        return ModelInfo(num_visual_tokens=layout.key()[0], num_layers=len(self.layers), hidden_size=self.hidden_size,
                         grid=grids[0] if len(grids) == 1 else None, grids=grids)

    # ---- LLM ----------------------------------------------------------------------------
    @property
    def layers(self):
        return self.lm.layers

    @property
    def hidden_size(self) -> int:
        return self.config.get_text_config().hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(input_ids)

    def positions(self, batch: dict) -> torch.Tensor:
        """[B, T] position ids as `generate` makes them for left-padded batches."""
        am = batch["attention_mask"]
        pos = am.long().cumsum(-1) - 1
        return pos.masked_fill(am == 0, 0)

    def next_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions of the next decoded token: one past the prompt's last (equal in every
        M-RoPE component after the text that ends every prompt)."""
        return positions[..., -1:] + 1

    def rotary(self, h: torch.Tensor, positions: torch.Tensor):
        return self.lm.rotary_emb(h, position_ids=positions)

    def needs_mask(self, keys: int) -> bool:
        """True when some layer must see an explicit mask over `keys` keys even without
        padding (a sliding window shorter than the sequence); the engine then never passes
        None (see `Engine._layer_mask`)."""
        return False

    def run_layer(self, index: int, h, mask, positions, cos_sin, cache):
        return self.layers[index](h, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                                  position_embeddings=cos_sin)

    def after_layer(self, index: int, h: torch.Tensor, slots: list[torch.Tensor], ids: list[torch.Tensor],
                    vision: list[VisionOutput]) -> torch.Tensor:
        """Family additions to a layer's output (DeepStack); `slots[r]` are where row r's
        visual tokens sit, `ids[r]` their indices into the row's full visual tokens."""
        return h

    def _project_qk(self, attn, xq: torch.Tensor, x: torch.Tensor):
        """Queries of xq and keys of x as [B, S, heads * hd], from separate or fused projections."""
        if hasattr(attn, "q_proj"):
            return attn.q_proj(xq), attn.k_proj(x)
        if hasattr(attn, "qkv_proj"):  # Phi-3: one fused [q; k; v] projection
            hd = attn.head_dim
            nq = self.config.get_text_config().num_attention_heads * hd
            nk = self.config.get_text_config().num_key_value_heads * hd
            w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
            q = torch.nn.functional.linear(xq, w[:nq], None if b is None else b[:nq])
            k = torch.nn.functional.linear(x, w[nq:nq + nk], None if b is None else b[nq:nq + nk])
            return q, k
        raise NotImplementedError(f"{type(attn).__name__}: no q_proj/k_proj or qkv_proj")

    def _qk_norm(self, attn, q: torch.Tensor, k: torch.Tensor):
        """Per-head q/k norms where the family has them (Qwen3's q_norm/k_norm)."""
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k

    def _rope(self, q, k, query_cos_sin, key_cos_sin):
        """q [B, H, Q, hd] and k [B, KV, T, hd] rotated by (cos, sin) [B, Q|T, hd] pairs: the
        query rows' and every key's (a family whose rotary differs overrides this)."""
        (qcos, qsin), (kcos, ksin) = query_cos_sin, key_cos_sin
        return q * qcos[:, None] + rotate_half(q) * qsin[:, None], k * kcos[:, None] + rotate_half(k) * ksin[:, None]

    def query_key(self, layer: int, h: torch.Tensor, queries: torch.Tensor, positions: torch.Tensor):
        """Queries of the `queries` slots ([B, Q]) and keys of every slot at `layer`, after the
        layer's input norm and position encoding, from the layer's input `h` [B, T, D]:
        ([B, H, Q, hd], [B, KV, T, hd], softmax scaling)."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(h)
        b, t, _ = x.shape
        hd = attn.head_dim
        xq = torch.gather(x, 1, queries[..., None].expand(-1, -1, x.shape[-1]))
        q, k = self._project_qk(attn, xq, x)
        q, k = self._qk_norm(attn, q.view(b, queries.shape[1], -1, hd), k.view(b, t, -1, hd))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self.rotary(x, positions)  # [B, T, hd]: the queries' rows are gathered from it
        qcos, qsin = (torch.gather(c, 1, queries[..., None].expand(-1, -1, c.shape[-1])) for c in (cos, sin))
        q, k = self._rope(q, k, (qcos, qsin), (cos, sin))
        return q, k, attn.scaling

    def attention(self, layer: int, h: torch.Tensor, queries: torch.Tensor, positions: torch.Tensor,
                  key_mask: torch.Tensor) -> torch.Tensor:
        """[B, H, Q, T] attention probabilities of the `queries` slots ([B, Q]) at `layer`, from
        the layer's input `h` [B, T, D]: eager attention's numbers (causal mask and `key_mask`
        [B, T] applied, softmax in fp32) for just the rows asked for, so the model itself keeps
        its fast attention kernel and nothing materialises the T x T maps of every layer."""
        q, k, scaling = self.query_key(layer, h, queries, positions)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * scaling
        slots = torch.arange(h.shape[1], device=h.device)
        allowed = (slots[None, None, :] <= queries[..., None]) & key_mask.bool()[:, None, :]
        return torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.lm.norm(h))

    # ---- cost ---------------------------------------------------------------------------
    def llm_arch(self):
        from gripbench.flops import Arch

        return Arch.from_config(self.config)

    def vision_flops(self, vo: VisionOutput) -> float:
        """FLOPs of the vision tower and projector for one row (2 x MACs)."""
        raise NotImplementedError
