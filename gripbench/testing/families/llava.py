"""Tiny random `LlavaForConditionalGeneration` checkpoints of every LLaVA layout gripbench supports.

Each builder returns (model, processor), fp32 on CPU, deterministic: stock transformers
classes with tiny sizes, a stock processor (LlavaProcessor with CLIP/SigLIP image
processors, PixtralProcessor for Pixtral) and the offline word-level tokenizer of
`gripbench.zoo.model` (Pixtral's [IMG]/[IMG_BREAK]/[IMG_END] added as special tokens).

| variant            | tower (feature layer, strategy)             | LLM                     | as in                      |
|--------------------|---------------------------------------------|-------------------------|----------------------------|
| llava-clip         | CLIP 56/14 (-2, default: [CLS] dropped)     | Llama, MHA              | llava-hf/llava-1.5-7b-hf   |
| llava-multilayer   | CLIP 56/14 ([-2, -5] concatenated, default) | Llama, GQA              | multi-layer LLaVA variants |
| llava-mistral      | CLIP 56/14 (-2, full: [CLS] kept)           | Mistral, GQA            | full-strategy LLaVA        |
| llava-phi3         | CLIP 56/14 (-2, default)                    | Phi-3 (fused qkv)       | llava-phi-3-mini           |
| llava-siglip       | SigLIP 56/14, no head (-1, full)            | Qwen2, GQA              | llava-interleave-qwen      |
| llava-pixtral      | Pixtral, patch 8, longest edge 64 (-1, full)| Mistral, GQA            | mistral-community/pixtral-12b |

Weights are drawn N(0, 0.2) (matrices) so greedy outputs depend on the input.
"""

from __future__ import annotations

import copy
import functools

import torch
from PIL import Image

from gripbench.testing.families import spread_weights

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=512)
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=56,
            patch_size=14)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from gripbench.zoo.model import build_tokenizer

    return build_tokenizer()


def tokenizer(pixtral: bool = False):
    tok = copy.deepcopy(_tokenizer())
    if pixtral:
        tok.add_tokens(["[IMG]", "[IMG_BREAK]", "[IMG_END]"], special_tokens=True)
    return tok


def _text_config(kind: str, tok, kv_heads: int, **extra):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "phi3": Phi3Config, "qwen2": Qwen2Config}[kind]
    return cls(vocab_size=len(tok), num_key_value_heads=kv_heads, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **{**TEXT, **extra})


def _model(cfg, tok, seed: int):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return spread_weights(LlavaForConditionalGeneration(cfg), tok, seed)


def _llava(vision, text_kind: str, layer, strategy: str, seed: int, kv_heads: int = 2, siglip: bool = False,
           **text_extra):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor, SiglipImageProcessor

    from gripbench.zoo.model import CHAT_TEMPLATE

    tok = tokenizer()
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config(text_kind, tok, kv_heads, **text_extra),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy)
    size = vision.image_size
    if siglip:
        image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    else:
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vision.patch_size,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=0 if siglip else 1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")
    return _model(cfg, tok, seed), proc


def build_clip():
    """CLIP tower, `default` strategy (the [CLS] dropped), Llama with plain multi-head attention."""
    from transformers import CLIPVisionConfig

    return _llava(CLIPVisionConfig(**CLIP), "llama", -2, "default", seed=101, kv_heads=4)


def build_multilayer():
    """CLIP tower with features of two layers concatenated (the projector takes 2 x Dv)."""
    from transformers import CLIPVisionConfig

    return _llava(CLIPVisionConfig(**{**CLIP, "num_hidden_layers": 5}), "llama", [-2, -5], "default", seed=102)


def build_mistral(sliding_window: int | None = 4096):
    """CLIP tower, `full` strategy (the [CLS] kept as the first visual token), Mistral (a
    `sliding_window` shorter than the prompt tests the windowed mask)."""
    from transformers import CLIPVisionConfig

    return _llava(CLIPVisionConfig(**CLIP), "mistral", -2, "full", seed=103, sliding_window=sliding_window)


def build_phi3():
    """CLIP tower, `default` strategy, Phi-3 (fused qkv_proj and gate_up_proj)."""
    from transformers import CLIPVisionConfig

    return _llava(CLIPVisionConfig(**CLIP), "phi3", -2, "default", seed=104)


def build_siglip():
    """llava-interleave-qwen's layout: SigLIP (no [CLS], no pooling head), Qwen2, `full`, last layer."""
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(**CLIP, vision_use_head=False)
    return _llava(vision, "qwen2", -1, "full", seed=105, siglip=True)


def build_pixtral():
    """mistral-community/pixtral-12b's layout: a Pixtral tower (dynamic resolution, 2-D RoPE, images
    flattened into one sequence with block-diagonal attention) and a Mistral LLM; each image row of
    patches ends in [IMG_BREAK], the image in [IMG_END]."""
    from transformers import LlavaConfig, PixtralImageProcessor, PixtralProcessor, PixtralVisionConfig

    from gripbench.zoo.model import CHAT_TEMPLATE

    tok = tokenizer(pixtral=True)
    vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                 image_size=64, patch_size=8, rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = LlavaConfig(vision_config=vision, text_config=_text_config("mistral", tok, 2),
                      image_token_index=tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1,
                      vision_feature_select_strategy="full", projector_hidden_act="gelu")
    proc = PixtralProcessor(image_processor=PixtralImageProcessor(size={"longest_edge": 64},
                                                                  patch_size={"height": 8, "width": 8}),
                            tokenizer=tok, patch_size=8, chat_template=CHAT_TEMPLATE.replace("<image>", "[IMG]"))
    return _model(cfg, tok, seed=106), proc


def images() -> list:
    """Scenes of the task suite at different sizes and aspect ratios (PIL, RGB)."""
    from gripbench.tasks.suite import TASKS, make_sample

    sizes = [(96, 96), (96, 48), (40, 56), (72, 60)]  # (width, height)
    tasks = list(TASKS)
    return [make_sample(tasks[i % len(tasks)], "val", i).image.resize(s, Image.BILINEAR) for i, s in enumerate(sizes)]


def questions() -> list[str]:
    from gripbench.tasks.suite import TASKS, make_sample

    tasks = list(TASKS)
    return [make_sample(tasks[i % len(tasks)], "val", i).question for i in range(4)]
