"""Model zoo: the embedded tiny LLaVA that ships inside the package, and model loading."""

from __future__ import annotations

from pathlib import Path

from gripbench.errors import GripbenchError

EMBEDDED_DIR = Path(__file__).parent / "embedded"
# the embedded models by name: the default LLaVA, and a Qwen2-VL of the same recipe (issue 6/7)
EMBEDDED = {"embedded": EMBEDDED_DIR, "embedded-qwen": Path(__file__).parent / "embedded-qwen"}


def embedded_path(must_exist: bool = True) -> Path:
    """Folder of the shipped checkpoint, loadable with `from_pretrained` and no gripbench code."""
    if must_exist and not (EMBEDDED_DIR / "config.json").exists():
        raise GripbenchError(f"the embedded checkpoint is missing from {EMBEDDED_DIR}; run `gripbench zoo build`")
    return EMBEDDED_DIR


def resolve(model: str) -> str:
    """The path or hub id to load for `model`, or one clear error for a name that cannot be one."""
    import difflib
    import os

    if model == "embedded":
        return str(embedded_path())
    if model in EMBEDDED:
        if not (EMBEDDED[model] / "config.json").exists():
            raise GripbenchError(f"the {model} checkpoint is not in this install; build it with "
                                 f"`gripbench zoo build --family qwen2-vl --out {EMBEDDED[model]}`")
        return str(EMBEDDED[model])
    if os.path.isdir(model):
        if not (Path(model) / "config.json").exists():
            raise GripbenchError(f"model folder {model} holds no config.json: not a Hugging Face checkpoint")
        return model
    if os.path.exists(model):
        raise GripbenchError(f"model {model!r} is a file: give 'embedded', a checkpoint folder or a Hugging Face id")
    if "/" not in model:
        close = difflib.get_close_matches(model, list(EMBEDDED), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ": give 'embedded', a local checkpoint folder or a Hugging Face id"
        raise GripbenchError(f"unknown model {model!r}{hint}")
    return model


def check_model(model: str) -> None:
    """Fail early and cheaply (config only, no weights) on a model that cannot load."""
    from transformers import AutoConfig

    path = resolve(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError (not found offline), ValueError (unknown model type), JSON errors
        raise GripbenchError(f"cannot load model {model!r}: {_first_line(e)}") from None
    check_family(config, model)


def check_family(config, model: str) -> None:
    """Refuse, from the config alone, a model whose class no adapter supports (one line)."""
    from transformers import AutoModelForImageTextToText

    from gripbench.adapters import FAMILIES

    try:
        cls = AutoModelForImageTextToText._model_mapping[type(config)].__name__
    except KeyError:
        cls = f"{type(config).__name__} (no image-text-to-text class)"
    if cls not in FAMILIES:
        raise GripbenchError(f"model {model!r}: class {cls} is not supported (supported: {', '.join(sorted(FAMILIES))})")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load(model: str = "embedded", dtype=None, device: str | None = None):
    """(model, processor) for 'embedded', a local folder, or a Hugging Face id (offline cache).

    The embedded checkpoint is stored in fp16 to keep the package small; on CPU it runs in
    fp32 (fp16 matmuls are slow and inexact there), on CUDA in fp16.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = resolve(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.float16
    try:
        processor = AutoProcessor.from_pretrained(path)
        vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    except Exception as e:  # a user's folder: missing files (OSError), corrupt weights (safetensors), unknown types
        raise GripbenchError(f"cannot load model {model!r}: {_first_line(e)}") from None
    return vlm.eval(), processor
