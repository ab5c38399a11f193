"""Model zoo: the embedded tiny LLaVA that ships inside the package, and model loading."""

from __future__ import annotations

from pathlib import Path

from gripbench.errors import GripbenchError

EMBEDDED_DIR = Path(__file__).parent / "embedded"


def embedded_path(must_exist: bool = True) -> Path:
    """Folder of the shipped checkpoint, loadable with `from_pretrained` and no gripbench code."""
    if must_exist and not (EMBEDDED_DIR / "config.json").exists():
        raise GripbenchError(f"the embedded checkpoint is missing from {EMBEDDED_DIR}; run `gripbench zoo build`")
    return EMBEDDED_DIR


def load(model: str = "embedded", dtype=None, device: str | None = None):
    """(model, processor) for 'embedded', a local folder, or a Hugging Face id (offline cache).

    The embedded checkpoint is stored in fp16 to keep the package small; on CPU it runs in
    fp32 (fp16 matmuls are slow and inexact there), on CUDA in fp16.
    """
    import os

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = str(embedded_path()) if model == "embedded" else model
    if model != "embedded" and not os.path.isdir(path) and "/" not in path:
        raise GripbenchError(f"unknown model {model!r}: give 'embedded', a local checkpoint folder or a Hugging Face id")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.float16
    try:
        processor = AutoProcessor.from_pretrained(path)
        vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    except OSError as e:
        raise GripbenchError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
    return vlm.eval(), processor
