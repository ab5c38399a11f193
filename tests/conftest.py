"""Shared fixtures: the embedded model, a tiny random llava-hf-style model, fixed samples."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden snapshots in tests/golden/ instead of comparing with them")


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session")
def embedded():
    """(model, processor) of the shipped checkpoint, fp32 on CPU."""
    from gripbench.zoo import load

    return load("embedded", device="cpu")


def tiny_llava_hf(tmp_dir) -> str:
    """A randomly initialised llava-hf-style checkpoint (CLIP 56px/14 -> 16 tokens, 4-layer
    Llama with plain multi-head attention), saved with save_pretrained; returns its folder."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from gripbench.zoo.model import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(123)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # larger weights than the default init, so greedy outputs vary with the input
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>")
    model.save_pretrained(tmp_dir)
    proc.save_pretrained(tmp_dir)
    return str(tmp_dir)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(model, processor) of the tiny random llava-hf-style checkpoint, loaded from disk."""
    from gripbench.zoo import load

    return load(tiny_llava_hf(tmp_path_factory.mktemp("tiny_llava")), device="cpu")


@pytest.fixture(scope="session")
def samples():
    """Eight fixed validation questions, covering every task."""
    from gripbench.tasks.suite import TASKS, make_sample

    return [make_sample(t, "val", i) for i in range(2) for t in TASKS][:8]
