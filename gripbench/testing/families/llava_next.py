"""Tiny random LLaVA-NeXT and LLaVA-OneVision checkpoints (stock classes, stock processors).

Both use 42 px tiles with patch 14 (a 3 x 3 grid of 9 tokens per tile) and the grid
pinpoints 42 x 84, 84 x 42 and 84 x 84, so an image is cut into 1 x 2, 2 x 1 or 2 x 2 tiles
depending on its aspect ratio:

- `llava-next`: a 3-layer CLIP tower (a [CLS] per tile, the `default` strategy drops it,
  features from layer -2), LLaVA's MLP projector, a 4-layer Llama with grouped-query
  attention;
- `llava-onevision`: a 3-layer SigLIP tower (no [CLS], the `full` strategy, features from
  the last layer, no pooling head), a 4-layer Qwen2 (q/k/v biases). `vision_aspect_ratio` is
  `anyres_max_2` (the real checkpoints use `anyres_max_9` with 27 x 27 tiles): a 2 x 2
  tile map (6 x 6 tokens) exceeds 1.1 x 2 tiles of tokens and is bilinearly shrunk to
  4 x 4, a 1 x 2 map (3 x 6) is not, so the tests reach both of the stock packing's paths.

The tokenizer is the embedded model's offline word-level one with its LLaVA-1.5 chat
template (`USER: <image>\\n{question} ASSISTANT:`); the processors expand the one `<image>`
into the row's packed token count. Weights are drawn from N(0, 0.2) (bigger than the
default init) so greedy outputs depend on the input.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from gripbench.testing.families import spread_weights

TILE = 42
PATCH = 14
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]
ASPECT = "anyres_max_2"


@lru_cache(maxsize=2)
def _tokenizer(video: bool = False):
    """The embedded model's tokenizer; with `video`, plus a `<video>` special token (the
    OneVision processor counts its id in every prompt: without one it is `<unk>`)."""
    from gripbench.zoo.model import build_tokenizer

    tok = build_tokenizer()
    if video:
        tok.add_special_tokens({"additional_special_tokens": ["<video>"]}, replace_extra_special_tokens=False)
        tok.video_token = "<video>"
    return tok




def build_llava_next(seed: int = 0):
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor): CLIP + Llama, anyres tiles."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from gripbench.zoo.model import CHAT_TEMPLATE

    tok = _tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=TILE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_seq_length=(TILE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = spread_weights(LlavaNextForConditionalGeneration(cfg), tok, seed)
    improc = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                     image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE, image_token="<image>")
    return model, proc


def build_llava_onevision(seed: int = 0):
    """(LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor): SigLIP + Qwen2, anyres_max."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from gripbench.zoo.model import CHAT_TEMPLATE

    tok = _tokenizer(video=True)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS,
                               vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio=ASPECT)
    torch.manual_seed(seed)
    model = spread_weights(LlavaOnevisionForConditionalGeneration(cfg), tok, seed)
    improc = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    proc = LlavaOnevisionProcessor(image_processor=improc, tokenizer=tok,
                                   video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}),
                                   num_image_tokens=(TILE // PATCH) ** 2, vision_feature_select_strategy="full",
                                   chat_template=CHAT_TEMPLATE, image_token="<image>", vision_aspect_ratio=ASPECT)
    return model, proc


def images() -> list:
    """Four RGB images that take different anyres paths (height x width): a 48 x 48 square
    (2 x 2 tiles), a 40 x 80 wide one (1 x 2 tiles), an 80 x 40 tall one (2 x 1 tiles), and a
    40 x 64 one (1 x 2 tiles whose map the stock model unpads from 3 x 6 to 3 x 4)."""
    import numpy as np
    from PIL import Image

    out = []
    for i, (h, w) in enumerate([(48, 48), (40, 80), (80, 40), (40, 64)]):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(yy * 255 // h), (xx * 255 // w), ((yy + xx) * 127 // (h + w))], -1)
        noise = rng.integers(0, 96, size=(h, w, 3))
        out.append(Image.fromarray(((base + noise) % 256).astype("uint8"), "RGB"))
    return out
