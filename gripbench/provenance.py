"""What a cell's numbers depend on, as content hashes: the identity that resume compares.

A results folder is resumed cell by cell, so a cell computed by older code must never be
taken for a current one. Until now a cell's hash covered its fields and `__version__`,
which had not changed in 50 commits: a sweep after an edit to a baseline printed "0 cells
run" and kept the stale numbers. A cell's identity now covers everything that can change
its result (`gripbench.schema.IDENTITY_COLUMNS`):

- the method's code: its entry point's distribution and version, and a hash of the source
  files of its class hierarchy (`Registry.provenance`);
- its parameters, resolved with their defaults (part of the cell key);
- the model weights: a hub snapshot's commit, or a content hash of the checkpoint folder;
- the task: its lmms-eval YAML (and the task folder's Python, which holds its metric), and
  for the embedded tasks the hash of the generator that makes their data;
- the gripbench code that runs a cell and counts its tokens and FLOPs (`CELL_CODE`), and
  the versions of the packages that can change a number (`gripbench.versions.TRACKED`);
- the seed and the sample limit (part of the cell key).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import gripbench

PACKAGE = Path(gripbench.__file__).parent
# The modules that run inside a cell: evaluation, pruning, token counting, FLOPs, latency.
CELL_CODE = ("engine.py", *sorted(f"adapters/{p.name}" for p in (PACKAGE / "adapters").glob("*.py")),  # every family
             "context.py", "methods.py", "flops.py", "sweep.py", "evaluate.py",
             "lmms/model.py", "lmms/task_utils.py", "lmms/tasks.py")
_HUB_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """One hash over the files' names (relative to `root`) and contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_identity() -> str:
    """Hash of the gripbench code that computes a cell, and of the tracked package versions."""
    from gripbench.versions import TRACKED, installed

    h = hashlib.sha256(sha256_files([PACKAGE / f for f in CELL_CODE], PACKAGE).encode())
    h.update(json.dumps({n: installed(n) for n in TRACKED}, sort_keys=True).encode())
    return h.hexdigest()[:16]


_MODEL_CACHE: dict[tuple, str] = {}


def model_identity(model: str) -> str:
    """'hub:<commit>' for a Hugging Face snapshot (its revision names its content), else a
    content hash of the checkpoint folder's files (weights, config, tokenizer, processor).
    Hashing a 7B checkpoint reads ~15 GB once per process; the result is cached by the
    files' sizes and modification times."""
    from gripbench.zoo import resolve

    path = resolve(model)
    if not os.path.isdir(path):  # a hub id: the local snapshot folder of its cached revision
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, local_files_only=True)
    found = _HUB_SNAPSHOT.search(str(path) + "/")
    if found:
        return f"hub:{found.group(1)}"
    root = Path(path)
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    stamp = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stamp not in _MODEL_CACHE:
        _MODEL_CACHE[stamp] = sha256_files(files, root)[:16]
    return _MODEL_CACHE[stamp]


def task_identity(task: str, yaml_path: str | None = None) -> str:
    """Hash of what defines a task's samples and score: for an embedded task the generator's
    version and the YAML gripbench writes; for an lmms-eval task its YAML and the Python
    files beside it (its `process_results` and metric), plus lmms-eval's version."""
    from gripbench.lmms.tasks import PREFIX, VERSION, YAML
    from gripbench.versions import installed

    if task.startswith(PREFIX) and yaml_path is None:
        return hashlib.sha256(f"{VERSION}\0{YAML}".encode()).hexdigest()[:16]
    if not yaml_path or not os.path.isfile(yaml_path):
        return hashlib.sha256(f"{task}\0lmms-eval {installed('lmms-eval')}".encode()).hexdigest()[:16]
    folder = Path(yaml_path).parent
    files = [Path(yaml_path), *sorted(folder.glob("*.py"))]
    return hashlib.sha256(f"{sha256_files(files, folder)}\0lmms-eval {installed('lmms-eval')}".encode()).hexdigest()[:16]
