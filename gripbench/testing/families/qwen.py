"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints with their stock processors.

Every module is a stock transformers class (`Qwen2VLForConditionalGeneration`, ...,
`Qwen2VLImageProcessor`, `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` / `Qwen3VLProcessor`);
only the sizes differ from the released checkpoints:

- vision: patch 8, temporal patch 2, 2 x 2 merge (one LLM token per 16 x 16 pixels); the
  image processor's `min_pixels`/`max_pixels` keep images between 2 x 2 and 6 x 6 merged
  tokens with their aspect ratio (dynamic resolution, as the real processor does on larger
  images). Qwen2.5-VL: depth 3 with blocks 0-1 windowed (window 32 px = 2 x 2 merged tokens)
  and block 2 full, like the real 7/15/23/31 pattern; Qwen3-VL: depth 3, learned 4 x 4
  position grid interpolated to each image, DeepStack features from blocks 0 and 1;
- LLM: 4 layers, hidden 64, 4 heads (2 KV heads), M-RoPE sections summing to head_dim / 2
  (Qwen3-VL interleaved, with q/k norms);
- tokenizer: a word-level `tokenizers` model with the family's special tokens, wrapped as a
  standard fast tokenizer, and a chat template that renders the family's prompt
  (`<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>question<|im_end|>\\n
  <|im_start|>assistant\\n`; Qwen2/2.5 with their default system turn).

Weights are drawn larger than the default init (N(0, 0.2)) so that greedy outputs depend on
the input. Everything is fp32 on CPU and deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gripbench.testing.families import spread_weights

PATCH = 8
MERGE = 2
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4    # 2 x 2 merged tokens
MAX_PIXELS = (PATCH * MERGE) ** 2 * 36   # 6 x 6 merged tokens

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<unk>"]
WORDS = ("system user assistant you are a helpful . , ? : what is the color of shape how many there in image "
         "describe this picture red blue green yellow left right top bottom yes no circle square triangle star "
         "which side does it contain object objects big small and or not one two three four five six seven eight "
         "nine ten 0 1 2 3 4 5 6 7 8 9").split()

# Qwen2-VL / Qwen2.5-VL: the released template's rendering of one user turn (default system turn included)
_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and SYSTEM %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(system: bool) -> str:
    return _TEMPLATE.replace("SYSTEM", "true" if system else "false")


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    for i in range(160 - len(vocab)):  # filler words, so the output distribution is not tiny
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        padding_side="left", model_max_length=1024,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                              "im_start_token": "<|im_start|>"},
    )


def _image_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, temporal_patch_size=2,
                                 merge_size=MERGE)


def _video_processor(qwen3: bool = False):
    """The stock video processor (the processors require one; no test feeds videos)."""
    if qwen3:
        from transformers import Qwen3VLVideoProcessor as cls
    else:
        from transformers import Qwen2VLVideoProcessor as cls
    return cls(patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE)


def _ids(tok) -> dict:
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def _text(tok, hidden: int, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                bos_token_id=None, eos_token_id=tok.eos_token_id, **extra)


def _rope(hidden: int, sections: list[int], interleaved: bool = False) -> dict:
    """M-RoPE (t, h, w) sections for head_dim = hidden / 4, in the released configs' proportions
    (Qwen2/2.5 [16, 24, 24], Qwen3 interleaved [24, 20, 20] of head_dim / 2); given for hidden 64."""
    out = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [x * hidden // 64 for x in sections]}
    if interleaved:
        out["mrope_interleaved"] = True
    return out




def build_qwen2_vl(hidden: int = 64):
    """(model, processor): a tiny Qwen2-VL (Qwen2VLForConditionalGeneration). `hidden` is the
    LLM width (64; 192 matches the shipped GRIP/DynamicViT scorers, trained on the embedded model)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = build_tokenizer()
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=_text(tok, hidden, rope_parameters=_rope(hidden, [2, 3, 3])),
                        vision_config=vision, **_ids(tok))
    torch.manual_seed(0)
    model = spread_weights(Qwen2VLForConditionalGeneration(cfg), tok, 1)
    proc = Qwen2VLProcessor(image_processor=_image_processor(), tokenizer=tok, video_processor=_video_processor(),
                             chat_template=chat_template(True))
    return model, proc


def build_qwen2_5_vl(hidden: int = 64):
    """(model, processor): a tiny Qwen2.5-VL with windowed and full-attention vision blocks."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = build_tokenizer()
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=2 * MERGE * PATCH,
                  fullatt_block_indexes=[2])
    cfg = Qwen2_5_VLConfig(text_config=_text(tok, hidden, rope_parameters=_rope(hidden, [2, 3, 3])),
                           vision_config=vision, **_ids(tok))
    torch.manual_seed(0)
    model = spread_weights(Qwen2_5_VLForConditionalGeneration(cfg), tok, 2)
    proc = Qwen2_5_VLProcessor(image_processor=_image_processor(), tokenizer=tok, video_processor=_video_processor(),
                               chat_template=chat_template(True))
    return model, proc


def build_qwen3_vl(hidden: int = 64):
    """(model, processor): a tiny Qwen3-VL with DeepStack features from vision blocks 0 and 1."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok = build_tokenizer()
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    cfg = Qwen3VLConfig(text_config=_text(tok, hidden, head_dim=hidden // 4, rope_parameters=_rope(hidden, [4, 2, 2], interleaved=True)),
        vision_config=vision, **_ids(tok))
    torch.manual_seed(0)
    model = spread_weights(Qwen3VLForConditionalGeneration(cfg), tok, 3)
    proc = Qwen3VLProcessor(image_processor=_image_processor(), tokenizer=tok, video_processor=_video_processor(True),
                            chat_template=chat_template(False))
    return model, proc


def images() -> list:
    """Five images of different sizes and aspect ratios (after the processor: 3x4, 5x3, 2x6, 4x4
    and 4x3 merged tokens; the first and third have the same count but different grids)."""
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (48, 80), (96, 32), (64, 64), (60, 50)]  # (width, height)
    out = []
    for w, h in sizes:
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.NEAREST)
        out.append(img)
    return out
