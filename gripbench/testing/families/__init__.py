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
