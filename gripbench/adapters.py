"""Model adapters: the seam between the engine and one family of Hugging Face VLMs.

The engine only needs, per family: the vision features (and, on request, the vision
tower's attention at the feature layer), token embeddings, position ids for the whole
sequence, the rotary embedding, the decoder layers, and the head. Position ids are
gathered along their last dimension, so a family with 3-D positions (Qwen2-VL's
M-RoPE, shape [3, B, T]) fits by returning them from `positions` with no change to the
engine or to any method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.models.llama.modeling_llama import rotate_half  # the RoPE helper the Llama decoder itself uses

from gripbench.errors import GripbenchError
from gripbench.methods import ModelInfo


@dataclass
class VisionOutput:
    """Per-image vision results, computed once and reusable across methods and budgets.

    `features` [B, N, D] are the projector outputs that replace the image placeholders.
    `_attn_input` is the hidden state entering the feature layer's attention, kept so that
    the [CLS] attention row and keys are computed only for methods that ask for them.
    """

    features: torch.Tensor
    attn_input: torch.Tensor | None = None
    pre_projector: torch.Tensor | None = None  # [B, N, Dv] vision features before the projector
    _attention: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def select_rows(self, rows: torch.Tensor | list[int]) -> VisionOutput:
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        out = VisionOutput(self.features[rows], pick(self.attn_input), pick(self.pre_projector))
        if self._attention is not None:
            out._attention = (self._attention[0][rows], self._attention[1][rows])
        return out

    @staticmethod
    def cat(parts: list[VisionOutput]) -> VisionOutput:
        join = lambda ts: None if any(t is None for t in ts) else torch.cat(ts)  # noqa: E731
        out = VisionOutput(torch.cat([p.features for p in parts]), join([p.attn_input for p in parts]),
                           join([p.pre_projector for p in parts]))
        if all(p._attention is not None for p in parts):
            out._attention = (torch.cat([p._attention[0] for p in parts]), torch.cat([p._attention[1] for p in parts]))
        return out


class LlavaAdapter:
    """LLaVA family (`LlavaForConditionalGeneration`): CLIP/SigLIP tower + Llama-style LLM."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.image_token_id = self.config.image_token_id
        vcfg = self.config.vision_config
        self.grid = vcfg.image_size // vcfg.patch_size
        self.feature_layer = self.config.vision_feature_layer
        self.strategy = self.config.vision_feature_select_strategy
        if not isinstance(self.feature_layer, int):
            raise GripbenchError("LLaVA checkpoints with several vision feature layers are not supported yet")

    @property
    def layers(self):
        return self.lm.layers

    def info(self) -> ModelInfo:
        n = self.grid * self.grid + (0 if self.strategy == "default" else 1)
        return ModelInfo(num_visual_tokens=n, num_layers=len(self.layers),
                         hidden_size=self.config.text_config.hidden_size,
                         grid=(self.grid, self.grid) if self.strategy == "default" else None)

    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor) -> VisionOutput:
        """Projector outputs, exactly as `LlavaModel.get_image_features` computes them."""
        dtype = self.vision_tower.dtype if hasattr(self.vision_tower, "dtype") else pixel_values.dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        selected = hs[self.feature_layer]
        if self.strategy == "default":
            selected = selected[:, 1:]
        idx = self.feature_layer % len(hs)  # hidden_states[i] is the output of encoder layer i-1
        return VisionOutput(self.projector(selected), attn_input=hs[idx - 1] if idx >= 1 else None,
                            pre_projector=selected)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The multimodal projector, for methods that merge vision features before it."""
        return self.projector(vision_features)

    @torch.no_grad()
    def vision_attention(self, vo: VisionOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, H, N] attention to each visual token, [B, N, Dk] keys averaged over heads) at
        the feature layer.

        The attention is the [CLS] row when the tower has a CLS token (CLIP), else the mean
        attention each patch receives (SigLIP). Computed from the layer's own q/k, so the
        tower itself keeps running with SDPA.
        """
        if vo._attention is not None:
            return vo._attention
        if vo.attn_input is None:
            raise GripbenchError("this vision tower exposes no attention at its feature layer")
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # v4 wraps, v5 does not
        hs_count = len(tower.encoder.layers) + 1
        layer = tower.encoder.layers[self.feature_layer % hs_count - 1]
        attn = layer.self_attn
        x = layer.layer_norm1(vo.attn_input)
        b, t, _ = x.shape
        has_cls = t == self.grid * self.grid + 1
        k = attn.k_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        xq = x[:, :1] if has_cls else x  # only the [CLS] query row is needed when there is one
        q = attn.q_proj(xq).view(b, xq.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)
        if not has_cls:
            row, keys = probs.mean(dim=2), k
        elif self.strategy == "default":
            row, keys = probs[:, :, 0, 1:], k[:, :, 1:]
        else:  # 'full' keeps CLS as a visual token
            row, keys = probs[:, :, 0, :], k
        vo._attention = (row, keys.mean(dim=1))
        return vo._attention

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(input_ids)

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] position ids as `generate` makes them for left-padded batches."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    def next_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[..., -1:] + 1

    def rotary(self, h: torch.Tensor, positions: torch.Tensor):
        return self.lm.rotary_emb(h, position_ids=positions)

    def query_key(self, layer: int, h: torch.Tensor, queries: torch.Tensor, positions: torch.Tensor):
        """Queries of the `queries` slots ([B, Q]) and keys of every slot at `layer`, after the
        layer's input norm and RoPE, from the layer's input `h` [B, T, D]: ([B, H, Q, hd],
        [B, KV, T, hd], softmax scaling). The one place that knows the attention layout and
        the rotary scheme (a Qwen2-VL adapter applies its 3-D M-RoPE here), so methods that
        read attention rows never depend on the model family."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(h)
        b, t, _ = x.shape
        hd = attn.head_dim
        xq = torch.gather(x, 1, queries[..., None].expand(-1, -1, x.shape[-1]))
        q = attn.q_proj(xq).view(b, queries.shape[1], -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        cos, sin = self.rotary(x, positions)  # [B, T, hd]: the queries' rows are gathered from it
        qcos, qsin = (torch.gather(c, 1, queries[..., None].expand(-1, -1, c.shape[-1])) for c in (cos, sin))
        q = q * qcos[:, None] + rotate_half(q) * qsin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
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


def adapter_for(model) -> LlavaAdapter:
    """The adapter for a loaded model, or a clear error for an unsupported family."""
    name = type(model).__name__
    if name == "LlavaForConditionalGeneration":
        return LlavaAdapter(model)
    raise GripbenchError(f"model class {name} is not supported yet (supported: LlavaForConditionalGeneration)")
