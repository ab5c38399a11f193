"""The embedded VLM: a tiny but real LLaVA built from stock transformers classes.

Why stock classes: every code path gripbench exercises on this 6 M-parameter model
(the processor, `get_image_features`, the Llama decoder layers, generation) is the one
that runs on llava-hf/llava-1.5-7b-hf. Only the sizes differ:

- vision: CLIP, 96 x 96 pixels, patch 8 -> 12 x 12 = 144 visual tokens, features from
  the penultimate layer (LLaVA-1.5's `vision_feature_layer = -2`, CLS dropped);
- projector: LLaVA's two-layer GELU MLP;
- LLM: Llama with grouped-query attention, 8 layers so that in-LLM pruning methods
  (FastV, SparseVLM) have room to act at several depths;
- tokenizer: a word-level `tokenizers` model over the task suite's words, wrapped as a
  standard fast tokenizer; a LLaVA-1.5-style chat template.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from gripbench.tasks.scenes import COLORS, SHAPES, SceneConfig
from gripbench.tasks.suite import TASKS, answer_vocabulary, make_sample

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

# LLaVA-1.5's conversation format, accepting string or list-of-parts content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for p in parts %}{% if p['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt_text(question: str) -> str:
    """The chat template's rendering of one image + question turn (kept in sync by a test)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def _words(extra: tuple[str, ...] = ()) -> list[str]:
    pre = pre_tokenizers.Whitespace()
    texts = [" ".join(extra), "user : assistant : . ? ,", " ".join(answer_vocabulary()), " ".join(COLORS), " ".join(SHAPES),
             " ".join(f"{s}s" for s in SHAPES), "sign objects object"]
    texts += [make_sample(t, "val", i).question for t in TASKS for i in range(200)]
    return sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t.lower())})


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The word-level tokenizer over the task suite's words (and `extra_words`, e.g. the
    captions' words for a model pretrained on captions)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + _words(tuple(extra_words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"}, model_max_length=512,
    )


def build_processor(scene: SceneConfig = SceneConfig()) -> LlavaProcessor:
    size = scene.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_resize=True, do_center_crop=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=scene.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


def build_config(tokenizer: PreTrainedTokenizerFast, scene: SceneConfig = SceneConfig(), init_range: float = 0.02) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=scene.image_size, patch_size=scene.patch_size, projection_dim=192,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=init_range,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=scene.num_patches, tie_word_embeddings=True,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, init_range: float = 0.02) -> LlavaForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer, init_range=init_range))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    return model
