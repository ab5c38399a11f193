"""Tiny randomly initialised checkpoints of every supported VLM family, with processors.

Real checkpoints cannot be downloaded on the machines gripbench is tested on, so each
family's code paths are tested on stock transformers classes with tiny configs built here
(and saved/loaded with `save_pretrained`/`from_pretrained` where a test needs the folder).
`FAMILIES` maps a family variant name to "module:function"; the function takes no
arguments and returns (model, processor), fp32 on CPU, deterministic.
`images()` of each module gives test images of different sizes and aspect ratios.
"""

from __future__ import annotations

from importlib import import_module

import torch

FAMILIES: dict[str, str] = {
    "qwen2-vl": "gripbench.testing.families.qwen:build_qwen2_vl",
    "qwen2.5-vl": "gripbench.testing.families.qwen:build_qwen2_5_vl",
    "qwen3-vl": "gripbench.testing.families.qwen:build_qwen3_vl",
    "llava-next": "gripbench.testing.families.llava_next:build_llava_next",
    "llava-onevision": "gripbench.testing.families.llava_next:build_llava_onevision",
    "llava-clip": "gripbench.testing.families.llava:build_clip",
    "llava-siglip": "gripbench.testing.families.llava:build_siglip",
    "llava-multilayer": "gripbench.testing.families.llava:build_multilayer",
    "llava-mistral": "gripbench.testing.families.llava:build_mistral",
    "llava-phi3": "gripbench.testing.families.llava:build_phi3",
    "llava-pixtral": "gripbench.testing.families.llava:build_pixtral",
}


def build(name: str):
    """(model, processor) of a tiny checkpoint of family variant `name`."""
    module, fn = FAMILIES[name].split(":")
    return getattr(import_module(module), fn)()


def family_images(name: str) -> list:
    """Images of different sizes and aspect ratios for family variant `name`."""
    module, _ = FAMILIES[name].split(":")
    return import_module(module).images()


def spread_weights(model, tokenizer, seed: int):
    """Random weights N(0, 0.2), larger than the default init so greedy outputs vary with the
    input, from a generator of their own (reproducible whatever ran before); greedy
    generation config with the tokenizer's special tokens. Returns the model in eval mode."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    return model.eval()

