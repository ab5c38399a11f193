"""Model adapters: the seam between the engine and each family of Hugging Face VLMs.

The protocol is `gripbench.adapters.base.Adapter` (documented there and in the README);
`adapter_for(model)` picks the family from the stock model class.
"""

from __future__ import annotations

from importlib import import_module

from gripbench.adapters.base import Adapter, VisionOutput, VisionView, VisualLayout
from gripbench.errors import GripbenchError

# stock class name -> "module:AdapterClass" (imported on use, so one family's import cost or
# a transformers version without it does not touch the others)
FAMILIES = {
    "Qwen2VLForConditionalGeneration": "gripbench.adapters.qwen:QwenVLAdapter",
    "Qwen2_5_VLForConditionalGeneration": "gripbench.adapters.qwen:Qwen2_5_VLAdapter",
    "Qwen3VLForConditionalGeneration": "gripbench.adapters.qwen:Qwen3VLAdapter",
    "LlavaNextForConditionalGeneration": "gripbench.adapters.llava_next:LlavaNextAdapter",
    "LlavaOnevisionForConditionalGeneration": "gripbench.adapters.llava_next:LlavaOnevisionAdapter",
    "LlavaForConditionalGeneration": "gripbench.adapters.llava:LlavaAdapter",
}


def adapter_for(model) -> Adapter:
    """The adapter for a loaded model, or one clear line for an unsupported family."""
    name = type(model).__name__
    if name not in FAMILIES:
        raise GripbenchError(f"model class {name} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    module, cls = FAMILIES[name].split(":")
    return getattr(import_module(module), cls)(model)


__all__ = ["FAMILIES", "Adapter", "VisionOutput", "VisionView", "VisualLayout", "adapter_for"]
