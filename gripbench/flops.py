"""Analytic FLOPs of a LLaVA-style VLM with pruning (FLOPs = 2 x multiply-accumulates).

Counted with the token count actually present at each point:

- vision tower (CLIP/SigLIP ViT), every encoder layer the stock forward runs, on T = n + 1
  tokens (patches + CLS): patch embedding n * 3 * p^2 * Dv; per layer q/k/v/o projections
  4 * T * Dv^2, attention scores and values 2 * T^2 * Dv, MLP 2 * T * Dv * Iv;
- projector (LLaVA's two-layer MLP): n * (Dv * D + D * D);
- LLM prefill, layer by layer with T_l tokens present: q and o projections 2 * T_l * D * (H * hd),
  k and v projections 2 * T_l * D * (KV * hd) (grouped-query attention), scores and values
  2 * T_l^2 * H * hd (the full square, as SDPA's math kernel and FLOP counters compute it),
  SwiGLU MLP 3 * T_l * D * I; then the LM head on the last position, D * V;
- decode, per generated token with L_l cached keys at layer l: the projections and MLP on
  one token, scores and values 2 * (L_l + 1) * H * hd, and the LM head.

Norms, activations, softmax and rotary embeddings are not counted (as in fvcore and
`torch.utils.flop_counter`). The pruning method's own work is added by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """The dimensions that FLOPs depend on."""

    patch: int
    vision_dim: int
    vision_mlp: int
    vision_layers: int
    vision_head_dim: int
    num_patches: int
    vision_cls: bool
    dim: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @staticmethod
    def from_config(config) -> Arch:
        v, t = config.vision_config, config.text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return Arch(patch=v.patch_size, vision_dim=v.hidden_size, vision_mlp=v.intermediate_size,
                    vision_layers=v.num_hidden_layers, vision_head_dim=v.hidden_size // v.num_attention_heads,
                    num_patches=(v.image_size // v.patch_size) ** 2,
                    vision_cls="clip" in v.model_type, dim=t.hidden_size, mlp=t.intermediate_size,
                    heads=t.num_attention_heads, kv_heads=t.num_key_value_heads, head_dim=head_dim,
                    layers=t.num_hidden_layers, vocab=t.vocab_size)


def vision_macs(a: Arch) -> int:
    n = a.num_patches
    t = n + (1 if a.vision_cls else 0)
    per_layer = 4 * t * a.vision_dim ** 2 + 2 * t * t * a.vision_dim + 2 * t * a.vision_dim * a.vision_mlp
    return n * 3 * a.patch ** 2 * a.vision_dim + a.vision_layers * per_layer


def projector_macs(a: Arch, n: int) -> int:
    return n * (a.vision_dim * a.dim + a.dim * a.dim)


def llm_layer_macs(a: Arch, tokens: int, keys: int | None = None) -> int:
    """One decoder layer on `tokens` queries attending over `keys` keys (default: tokens)."""
    keys = tokens if keys is None else keys
    proj = 2 * tokens * a.dim * a.heads * a.head_dim + 2 * tokens * a.dim * a.kv_heads * a.head_dim
    attn = 2 * tokens * keys * a.heads * a.head_dim
    return proj + attn + 3 * tokens * a.dim * a.mlp


def prefill_macs(a: Arch, tokens_per_layer: list[int]) -> int:
    """LLM prefill with the given sequence length at each layer, plus the LM head on the last position."""
    return sum(llm_layer_macs(a, t) for t in tokens_per_layer) + a.dim * a.vocab


def decode_macs(a: Arch, kv_per_layer: list[int]) -> int:
    """One generated token, with kv_per_layer cached keys at each layer before it."""
    return sum(llm_layer_macs(a, 1, kv + 1) for kv in kv_per_layer) + a.dim * a.vocab


def cell_flops(a: Arch, text_tokens: int, visual_per_layer: list[int], new_tokens: int,
               method_flops: float = 0.0) -> dict[str, float]:
    """FLOPs of one generation: text_tokens non-visual prompt tokens, visual_per_layer visual
    tokens at each LLM layer, new_tokens generated (the first comes from the prefill)."""
    per_layer = [text_tokens + v for v in visual_per_layer]
    vision = 2 * (vision_macs(a) + projector_macs(a, a.num_patches))
    prefill = 2 * prefill_macs(a, per_layer)
    decode_one = 2 * decode_macs(a, per_layer)  # the first decode step; later ones add one key each
    decode_total = sum(2 * decode_macs(a, [t + i for t in per_layer]) for i in range(max(0, new_tokens - 1)))
    return {"flops_vision": float(vision), "flops_scorer": float(method_flops), "flops_llm_prefill": float(prefill),
            "flops_decode_per_token": float(decode_one),
            "flops_total": float(vision + method_flops + prefill + decode_total)}
