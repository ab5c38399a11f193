"""Analytic FLOPs of a LLaVA-style VLM with pruning (FLOPs = 2 x multiply-accumulates).

Counted with the token count actually present at each point:

- vision tower (CLIP / SigLIP / Pixtral ViT), every encoder layer the stock forward runs, on
  T = n (+ 1 where the tower has a [CLS]: CLIP; SigLIP and Pixtral have none) tokens of one
  image: patch embedding n * 3 * p^2 * Dv; per layer q/k/v/o projections 4 * T * Dv^2,
  attention scores and values 2 * T^2 * Dv, MLP m * T * Dv * Iv (m = 2 for fc1/fc2, 3 for
  Pixtral's gated MLP); SigLIP's attention-pooling head where the checkpoint runs it (one
  probe query: q and out projections 2 * Dv^2, k/v 2 * T * Dv^2, scores and values 2 * T * Dv,
  MLP 2 * Dv * Iv). Several images of one row (Pixtral's dynamic resolution: each image its
  own patch grid) cost the sum over images: attention is block-diagonal per image;
- projector (LLaVA's two-layer MLP) on the tokens it projects: n * (Din * D + D * D), with
  Din = Dv x the number of feature layers concatenated;
- LLM prefill, layer by layer with T_l tokens present: q and o projections 2 * T_l * D * (H * hd),
  k and v projections 2 * T_l * D * (KV * hd) (grouped-query attention), scores and values
  2 * T_l^2 * H * hd (the full square, as SDPA's math kernel and FLOP counters compute it),
  SwiGLU MLP 3 * T_l * D * I (Phi-3's fused qkv and gate-up projections cost the same); then
  the LM head on the last position, D * V;
- decode, per generated token with L_l cached keys at layer l: the projections and MLP on
  one token, scores and values 2 * (L_l + 1) * H * hd, and the LM head.

Norms, activations, softmax, biases and rotary embeddings are not counted (as in fvcore and
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
    vision_mlp_mats: int = 2      # weight matrices of the tower's MLP: 2 (fc1, fc2) or 3 (gated: Pixtral)
    vision_head: bool = False     # SigLIP's attention-pooling head runs (vision_use_head)
    projector_in: int = 0         # the projector's input width (Dv x feature layers); 0 = vision_dim
    image_tokens: int = 0         # tokens one default image gives the LLM; 0 = num_patches

    @property
    def projector_width(self) -> int:
        return self.projector_in or self.vision_dim

    @property
    def tokens_per_image(self) -> int:
        return self.image_tokens or self.num_patches

    @staticmethod
    def from_config(config) -> Arch:
        """From a LLaVA-style config (vision_config + text_config): CLIP, SigLIP or Pixtral
        towers, one or several feature layers, `default` or `full` selection."""
        v, t = config.vision_config, config.get_text_config()
        heads = t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
        model_type = getattr(v, "model_type", "")
        cls = "clip" in model_type and "siglip" not in model_type  # CLIP prepends a [CLS]; SigLIP, Pixtral do not
        size, patch = _pair(v.image_size), _pair(v.patch_size)
        patches = (size[0] // patch[0]) * (size[1] // patch[1])
        layers = getattr(config, "vision_feature_layer", -1)
        n_layers = 1 if isinstance(layers, int) else len(layers)
        strategy = getattr(config, "vision_feature_select_strategy", "full")
        tokens = patches + int(cls) - int(strategy == "default")
        return Arch(patch=patch[0], vision_dim=v.hidden_size, vision_mlp=v.intermediate_size,
                    vision_layers=v.num_hidden_layers,
                    vision_head_dim=getattr(v, "head_dim", None) or v.hidden_size // v.num_attention_heads,
                    num_patches=patches, vision_cls=cls, dim=t.hidden_size, mlp=t.intermediate_size,
                    heads=heads, kv_heads=getattr(t, "num_key_value_heads", None) or heads, head_dim=head_dim,
                    layers=t.num_hidden_layers, vocab=t.vocab_size,
                    vision_mlp_mats=3 if model_type == "pixtral" else 2,
                    vision_head=bool(getattr(v, "vision_use_head", False)) and "siglip" in model_type,
                    projector_in=v.hidden_size * n_layers, image_tokens=tokens)


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def vision_macs(a: Arch, patches: int | None = None) -> int:
    """The tower on one image of `patches` patches (default: the default image's)."""
    n = a.num_patches if patches is None else patches
    t = n + (1 if a.vision_cls else 0)
    dv = a.vision_dim
    per_layer = 4 * t * dv ** 2 + 2 * t * t * dv + a.vision_mlp_mats * t * dv * a.vision_mlp
    head = 2 * dv ** 2 + 2 * t * dv ** 2 + 2 * t * dv + 2 * dv * a.vision_mlp if a.vision_head else 0
    return n * 3 * a.patch ** 2 * dv + a.vision_layers * per_layer + head


def projector_macs(a: Arch, n: int) -> int:
    return n * (a.projector_width * a.dim + a.dim * a.dim)


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
    vision = 2 * (vision_macs(a) + projector_macs(a, a.tokens_per_image))
    prefill = 2 * prefill_macs(a, per_layer)
    decode_one = 2 * decode_macs(a, per_layer)  # the first decode step; later ones add one key each
    decode_total = sum(2 * decode_macs(a, [t + i for t in per_layer]) for i in range(max(0, new_tokens - 1)))
    return {"flops_vision": float(vision), "flops_scorer": float(method_flops), "flops_llm_prefill": float(prefill),
            "flops_decode_per_token": float(decode_one),
            "flops_total": float(vision + method_flops + prefill + decode_total)}


def flop_counter():
    """torch's `FlopCounterMode` (no display) that also counts SDPA on the CPU: torch >= 2.14
    runs SDPA there through `_scaled_dot_product_flash_attention_for_cpu`, which its counter
    does not know (it counts the CUDA flash/efficient kernels), so attention went uncounted.
    Registered once, with the CUDA kernels' formula: 2 x (Q K^T + P V) multiply-adds. What
    the tests and benchmarks compare the analytic counts against."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is not None and kernel not in flop_registry:
        @register_flop_formula(kernel)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)
    return FlopCounterMode(display=False)

