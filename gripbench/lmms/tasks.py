"""The embedded tasks as lmms-eval tasks: parquet data + YAML, generated and cached on first use.

lmms-eval hands `dataset_kwargs.data_files` straight to `datasets.load_dataset("parquet")`,
which resolves relative paths against the working directory, so the YAMLs are written next
to their data with absolute paths, in a cache folder (`$GRIPBENCH_CACHE`, default
`~/.cache/gripbench`) keyed by the generator version. Pass that folder to lmms-eval's
`--include_path` (`gripbench tasks --lmms-path` prints it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gripbench.tasks.suite import SPLIT_SIZES, TASKS, load_split


def _generator_version() -> str:
    """Hash of the task generator's source: cached task data is rebuilt whenever the scenes
    or questions change (a stale cache once served old images to a retrained model)."""
    import hashlib

    from gripbench.tasks import scenes, suite

    h = hashlib.sha256()
    for mod in (scenes, suite):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


VERSION = _generator_version()
PREFIX = "gripbench_"
YAML = """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def cache_root() -> Path:
    return Path(os.environ.get("GRIPBENCH_CACHE", Path.home() / ".cache" / "gripbench")) / "lmms_tasks" / VERSION


def task_name(task: str) -> str:
    return PREFIX + task


def _write_parquet(task: str, path: Path) -> None:
    from datasets import Dataset, Features, Image, Sequence, Value

    samples = load_split(task, "test")
    features = Features({"sample_id": Value("string"), "task": Value("string"), "question": Value("string"),
                         "answer": Value("string"), "evidence": Sequence(Value("int32")), "meta": Value("string"),
                         "image": Image()})
    ds = Dataset.from_dict({
        "sample_id": [s.id for s in samples], "task": [s.task for s in samples],
        "question": [s.question for s in samples], "answer": [s.answer for s in samples],
        "evidence": [s.evidence for s in samples], "meta": [json.dumps(s.meta) for s in samples],
        "image": [s.image for s in samples]}, features=features)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    ds.to_parquet(tmp)
    os.replace(tmp, path)


def materialize(tasks: list[str] | None = None) -> Path:
    """Write (once) the parquet data and YAML of each embedded task; returns the include path."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    utils = root / "utils.py"
    if not utils.exists():
        utils.write_text("from gripbench.lmms.task_utils import doc_to_text, doc_to_visual, process_results  # noqa: F401\n")
    for task in list(TASKS) if tasks is None else tasks:
        data = root / f"{task}-test-{SPLIT_SIZES['test']}.parquet"
        if not data.exists():
            _write_parquet(task, data)
        yaml = root / f"{task_name(task)}.yaml"
        text = YAML.format(name=task_name(task), data=data)
        if not yaml.exists() or yaml.read_text() != text:  # atomic: another sweep may read it right now
            fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, yaml)
    return root
