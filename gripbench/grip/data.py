"""What the scorers train on: the embedded procedural tasks, an lmms-eval task, a Hugging
Face dataset saved on disk, or a folder with a `data.jsonl`, behind one small interface.

    --data embedded                      the embedded task suite (the default)
    --data lmms:TASK[:SPLIT]             an lmms-eval task (a bare TASK name works too); its own
                                         prompts, targets, filters and per-sample metric
    --data PATH[:SPLIT]                  `datasets.save_to_disk` output, or a folder holding
                                         data.jsonl, or a .jsonl file (image path relative to it)

Why one interface: the trainers only need (image, question, reference answer) rows, a
deterministic stream of training rows, held-out rows to validate on, and a way to score
a generated answer. Scoring follows the data: an lmms-eval task is scored by its own
`process_results` and headline metric (the number a sweep reports for that task, so
GRPO optimises what is measured), anything else by gripbench's normalised exact match.

Splits: the embedded suite has its own disjoint train and validation splits. Any other
data comes as one split (the task's training split if it has one, else validation, else
test; or the one asked for), and a validation part is carved out of it by a permutation
under the seed, so warm-up and GRPO runs with the same seed share it and never train on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gripbench.errors import GripbenchError
from gripbench.evaluate import normalize

MAX_NEW_TOKENS = 16  # cap on an lmms-eval task's own max_new_tokens: the answers scored here are short


@dataclass
class TrainSample:
    """One training or validation row. `answer` is the reference the dense reward scores
    (teacher-forced log-likelihood); `doc` is the lmms-eval document its metric reads."""

    id: str
    image: Any
    question: str
    answer: str
    task: str
    doc: Any = None


def majority(target) -> str:
    """A reference answer from a target that may be a list (VQA's ten answers): the most
    common one, ties to the earliest."""
    if isinstance(target, (list, tuple)):
        if not target:
            return ""
        counts = Counter(str(t) for t in target)
        return max(counts, key=lambda a: (counts[a], -[str(t) for t in target].index(a)))
    return str(target)


class TrainingData:
    """Base: a finite list of rows with a validation part carved under the seed."""

    kind = "rows"
    generative = True       # reward correctness from a generated answer scored by `score`
    max_new_tokens = 8
    until: tuple[str, ...] = ()
    metric = "normalised exact match"

    def __init__(self, spec: str, name: str, split: str | None, n: int, seed: int, val_samples: int,
                 val_fraction: float):
        if n < 2:
            raise GripbenchError(f"--data {spec}: {n} sample(s); training needs at least 2 (one to train, one to validate)")
        self.spec, self.name, self.split, self.seed = spec, name, split, seed
        n_val = min(val_samples, max(1, round(val_fraction * n)), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
        self.val_idx, self.train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])
        self._epochs: dict[int, list[int]] = {}
        self._val: list | None = None

    # ---- rows ---------------------------------------------------------------------------------
    def row(self, i: int) -> TrainSample:
        raise NotImplementedError

    def train_batch(self, start: int, n: int) -> list:
        """Rows start..start+n-1 of an endless stream: the training rows in a fresh seeded
        order each epoch, so step s always sees the same rows."""
        out = []
        for i in range(start, start + n):
            epoch, pos = divmod(i, len(self.train_idx))
            if epoch not in self._epochs:
                g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
                self._epochs = {epoch: torch.randperm(len(self.train_idx), generator=g).tolist()}
            out.append(self.row(self.train_idx[self._epochs[epoch][pos]]))
        return out

    def validation(self) -> list:
        if self._val is None:
            self._val = [self.row(i) for i in self.val_idx]
        return self._val

    # ---- scoring ------------------------------------------------------------------------------
    def score(self, sample, prediction: str) -> float:
        return float(normalize(prediction) == normalize(sample.answer))

    def truncate(self, text: str) -> str:
        for stop in self.until:
            if stop and stop in text:
                text = text.split(stop)[0]
        return text

    def validate(self, engine, method_at, budgets, batch_size: int = 64) -> dict[str, float]:
        """Mean score of greedy answers with `method_at(rho)` pruning, on the held-out rows."""
        rows = self.validation()
        out = {}
        for rho in budgets:
            method, scores = method_at(rho), []
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                batch = engine.prepare([s.image for s in chunk], [s.question for s in chunk])
                gen = engine.generate(batch, method, max_new_tokens=self.max_new_tokens)
                scores += [self.score(s, self.truncate(t)) for s, t in zip(chunk, gen.texts)]
            out[f"acc@{rho:g}"] = sum(scores) / len(scores)
        return out

    # ---- provenance ---------------------------------------------------------------------------
    def identity(self) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "name": self.name, "split": self.split,
                "identity": self.identity(), "n_train": len(self.train_idx), "n_val": len(self.val_idx),
                "val_seed": self.seed, "metric": self.metric, "max_new_tokens": self.max_new_tokens}

    def summary(self) -> str:
        return (f"training on {self.kind} data {self.name!r}" + (f", split {self.split!r}" if self.split else "")
                + f": {len(self.train_idx)} training and {len(self.val_idx)} validation samples (carved under seed "
                f"{self.seed}); scored by {self.metric}")


class EmbeddedData(TrainingData):
    """The embedded procedural suite: endless fresh training scenes, the fixed validation split.
    Rewards and validation exactly as before `--data` existed (teacher-forced exact match)."""

    kind = "embedded"
    generative = False
    max_new_tokens = 3

    def __init__(self, seed: int, val_per_task: int):
        self.spec, self.name, self.split, self.seed, self.val_per_task = "embedded", "embedded", "train", seed, val_per_task
        self._val = None

    def train_batch(self, start: int, n: int) -> list:
        from gripbench.tasks.suite import TASKS, make_sample

        tasks = list(TASKS)
        return [make_sample(tasks[(start + j) % len(tasks)], "train", start + j, base_seed=self.seed + 101)
                for j in range(n)]

    def validation(self) -> list:
        from gripbench.tasks.suite import TASKS, load_split

        if self._val is None:
            self._val = [s for t in TASKS for s in load_split(t, "val", self.val_per_task)]
        return self._val

    def score(self, sample, prediction: str) -> float:
        return float(normalize(prediction) == sample.answer)

    def validate(self, engine, method_at, budgets, batch_size: int = 64) -> dict[str, float]:
        """Macro accuracy over the five tasks (each task counts alike)."""
        from gripbench.evaluate import accuracy, run_samples
        from gripbench.tasks.suite import TASKS

        val, out = self.validation(), {}
        for rho in budgets:
            res = run_samples(engine, val, method_at(rho), batch_size=batch_size)
            per = {t: accuracy([r for r, s in zip(res, val) if s.task == t]) for t in TASKS}
            out[f"acc@{rho:g}"] = sum(per.values()) / len(per)
        return out

    def identity(self) -> str:
        from gripbench.lmms.tasks import VERSION

        return f"generator:{VERSION}"

    def describe(self) -> dict:
        return {"spec": "embedded", "kind": "embedded", "name": "embedded", "split": "train (procedural)",
                "identity": self.identity(), "n_val": len(self.validation()), "metric": "normalised exact match"}

    def summary(self) -> str:
        return "training on the embedded task suite (procedural train split; validation split of the suite)"


# ---- local rows: a JSONL folder or a saved Hugging Face dataset -----------------------------------
FIELDS = ("image", "question", "answer")


def parse_columns(text: str | None) -> dict[str, str]:
    """'image=img,question=q,answer=a' -> {'image': 'img', ...} (unnamed fields keep their names)."""
    cols = {f: f for f in FIELDS}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in FIELDS or not value.strip():
            raise GripbenchError(f"--columns {text!r}: expected FIELD=COLUMN pairs with FIELD in {', '.join(FIELDS)}, "
                                 "e.g. image=img,question=q,answer=a")
        cols[key.strip()] = value.strip()
    return cols


def _open_image(value, root: Path, where: str):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            import io

            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value["path"]
    if isinstance(value, str):
        path = Path(value) if os.path.isabs(value) else root / value
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise GripbenchError(f"{where}: cannot read image {path} ({e.__class__.__name__})") from None
    raise GripbenchError(f"{where}: the image is a {type(value).__name__}, not an image, a path or image bytes")


class JsonlData(TrainingData):
    """Rows of a .jsonl file: {"image": path relative to the file's folder, "question", "answer"}."""

    kind = "jsonl"

    def __init__(self, spec: str, path: Path, columns: dict[str, str], seed: int, val_samples: int, val_fraction: float):
        self.path, self.root = path, path.parent
        self.records = []
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GripbenchError(f"--data {spec}: line {line_no} of {path} is not JSON ({e.msg})") from None
            missing = [c for c in columns.values() if not isinstance(rec, dict) or c not in rec]
            if missing:
                raise GripbenchError(f"--data {spec}: line {line_no} of {path} has no {missing[0]!r} field "
                                     "(map fields with --columns image=...,question=...,answer=...)")
            image = rec[columns["image"]]
            if isinstance(image, str) and not (Path(image) if os.path.isabs(image) else self.root / image).is_file():
                raise GripbenchError(f"--data {spec}: line {line_no} of {path}: no image file {image!r} in {self.root}")
            self.records.append((line_no, rec))
        self.columns = columns
        super().__init__(spec, path.parent.name if path.name == "data.jsonl" else path.stem, None, len(self.records),
                         seed, val_samples, val_fraction)

    def row(self, i: int) -> TrainSample:
        line_no, rec = self.records[i]
        c = self.columns
        image = _open_image(rec[c["image"]], self.root, f"{self.path} line {line_no}")
        return TrainSample(str(rec.get("id", line_no)), image, str(rec[c["question"]]), majority(rec[c["answer"]]), self.name)

    def identity(self) -> str:
        from gripbench.provenance import sha256_files

        images = {self.root / r[self.columns["image"]] for _, r in self.records if isinstance(r[self.columns["image"]], str)}
        files = [self.path, *images]
        inside = all(p.resolve().is_relative_to(self.root.resolve()) for p in files)
        return "sha256:" + sha256_files(files, self.root if inside else None)[:16]


class DiskData(TrainingData):
    """A Hugging Face dataset written by `save_to_disk` (a Dataset, or one split of a DatasetDict)."""

    kind = "hf-disk"

    def __init__(self, spec: str, path: Path, split: str | None, columns: dict[str, str], seed: int,
                 val_samples: int, val_fraction: float):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise GripbenchError(f"--data {spec}: {path} is not a dataset saved with save_to_disk "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            if split is None:
                split = next((s for s in ("train", "training", "validation", "val", "test") if s in ds), None)
                if split is None and len(names) == 1:
                    split = names[0]
                if split is None:
                    raise GripbenchError(f"--data {spec}: pick a split with {path}:SPLIT (splits: {', '.join(names)})")
            if split not in ds:
                from gripbench.errors import unknown

                raise unknown("split", split, names)
            ds = ds[split]
        elif split is not None:
            raise GripbenchError(f"--data {spec}: {path} holds one Dataset, not a DatasetDict: drop ':{split}'")
        missing = [c for c in columns.values() if c not in ds.column_names]
        if missing:
            raise GripbenchError(f"--data {spec}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
                                 "map them with --columns image=...,question=...,answer=...")
        self.ds, self.path, self.columns = ds, path, columns
        super().__init__(spec, path.name, split, len(ds), seed, val_samples, val_fraction)

    def row(self, i: int) -> TrainSample:
        rec, c = self.ds[i], self.columns
        image = _open_image(rec[c["image"]], self.path, f"{self.path} row {i}")
        return TrainSample(str(rec.get("id", i)), image, str(rec[c["question"]]), majority(rec[c["answer"]]), self.name)

    def identity(self) -> str:
        from gripbench.provenance import sha256_files

        files = [p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return "sha256:" + sha256_files(files, self.path)[:16]


# ---- an lmms-eval task ----------------------------------------------------------------------------
class LmmsData(TrainingData):
    """An lmms-eval task: its docs, `doc_to_visual`/`doc_to_text`/`doc_to_target`, its first
    filter pipeline (lmms-eval's own filter objects) and its headline per-sample metric."""

    kind = "lmms"

    def __init__(self, spec: str, name: str, split: str | None, include_path, seed: int, val_samples: int,
                 val_fraction: float):
        from gripbench.lmms.catalog import load_task, task_manager

        task = load_task(name, include_path)  # quiets lmms-eval's logs and the datasets progress bars
        if isinstance(task, dict):  # a group: get_task_dict nests its members
            raise GripbenchError(f"--data lmms:{name} is a group of tasks; train on one task at a time")
        cfg = task.config
        roles = {"training": cfg.training_split, "validation": cfg.validation_split, "test": cfg.test_split}
        available = list(task.dataset) if hasattr(task.dataset, "keys") else []
        if split is None:
            split = next((s for s in roles.values() if s), None)
            if split is None:
                raise GripbenchError(f"--data lmms:{name}: the task names no training, validation or test split")
        elif split not in available:
            from gripbench.errors import unknown

            raise unknown(f"split of task {name!r}:", split, available)
        self.role = next((r for r, s in roles.items() if s == split), "other")
        self.task, self.task_name, self.docs = task, name, task.dataset[split]
        self.config = {"metric_list": cfg.metric_list, "filter_list": cfg.filter_list}
        gen = dict(cfg.generation_kwargs or {})
        self.max_new_tokens = max(1, min(int(gen.get("max_new_tokens", MAX_NEW_TOKENS)), MAX_NEW_TOKENS))
        until = gen.get("until") or []
        self.until = tuple([until] if isinstance(until, str) else until)
        first = [f.get("name") for f in cfg.filter_list or [] if isinstance(f, dict)]
        self.filter_name = first[0] if first else "none"
        self.filters = next((e.filters for e in getattr(task, "_filters", []) if e.name == self.filter_name), [])
        self.yaml_path = task_manager(include_path).task_index.get(name, {}).get("yaml_path")
        self.include_path = include_path
        self._headline: str | None = None
        super().__init__(spec, name, split, len(self.docs), seed, val_samples, val_fraction)
        self.metric = "the task's headline metric (first of metric_list)"

    def row(self, i: int) -> TrainSample:
        doc = self.docs[i]
        visuals = self.task.doc_to_visual(doc)
        if not visuals:
            raise GripbenchError(f"task {self.task_name!r}: doc {i} has no image; the scorers need one image per question")
        image = visuals[0].convert("RGB") if hasattr(visuals[0], "convert") else visuals[0]
        text = self.task.doc_to_text(doc)
        description = self.task.config.description
        if description:
            from lmms_eval import utils

            text = utils.apply_template(description, doc) + text
        return TrainSample(str(i), image, str(text), majority(self.target(doc)), self.task_name, doc)

    def target(self, doc):
        """`doc_to_target`, except where the YAML names a column the docs lack (textvqa's
        `doc_to_target: "answer"` over docs with `answers`, which yields the literal word
        'answer'): then the docs' `answers` list, which its metric scores against."""
        declared = self.task.config.doc_to_target
        if (isinstance(declared, str) and declared not in doc and "{{" not in declared
                and isinstance(doc.get("answers"), (list, tuple)) and doc["answers"]):
            return doc["answers"]
        return self.task.doc_to_target(doc)

    def filtered(self, doc, prediction: str):
        """The prediction after the task's first filter pipeline, as lmms-eval applies it (a
        pipeline maps a list of per-doc response lists, e.g. take_first, regex extraction)."""
        resps: Any = [[prediction]]
        for f in self.filters:
            resps = list(f.apply(resps, [doc]))
        return resps[0] if self.filters else prediction

    def score(self, sample, prediction: str) -> float:
        from gripbench.lmms.metrics import headline, sample_score

        result = self.task.process_results(sample.doc, [self.filtered(sample.doc, prediction)])
        if self._headline is None:
            self._headline = headline(self.config, self.task_name, [result])[0]
        if self._headline not in result:
            raise GripbenchError(f"task {self.task_name!r}: its per-sample results lack the headline metric "
                                 f"{self._headline!r}")
        return sample_score(result[self._headline], self.task_name, self._headline)

    def identity(self) -> str:
        from gripbench.provenance import sha256_files, task_identity

        ident = task_identity(self.task_name, self.yaml_path)
        files = [Path(p) for p in _data_files(self.task.config.dataset_kwargs) if os.path.isfile(p)]
        if files:  # local data files (parquet, json): their content, not just the YAML naming them
            ident = hashlib.sha256(f"{ident}\0{sha256_files(files)}".encode()).hexdigest()[:16]
        return ident

    def describe(self) -> dict:
        d = super().describe()
        d.update(split_role=self.role, metric=self._headline, filter=self.filter_name,
                 include_path=[str(p) for p in ([self.include_path] if isinstance(self.include_path, (str, Path))
                                                else self.include_path or [])])
        return d

    def summary(self) -> str:
        return (f"training on lmms-eval task {self.task_name!r}, split {self.split!r} (its {self.role} split): "
                f"{len(self.train_idx)} training and {len(self.val_idx)} validation docs (carved under seed {self.seed}); "
                f"reward and validation by its headline metric under filter {self.filter_name!r}, "
                f"answers of at most {self.max_new_tokens} tokens")


def _data_files(kwargs) -> list[str]:
    files = (kwargs or {}).get("data_files") if isinstance(kwargs, dict) else None
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return list(files or [])


# ---- SPEC -> data ---------------------------------------------------------------------------------
def _path_and_split(spec: str) -> tuple[Path, str | None] | None:
    if os.path.exists(spec):
        return Path(spec), None
    head, sep, tail = spec.rpartition(":")
    if sep and head and os.path.exists(head):
        return Path(head), tail
    return None


def load_data(spec: str | None, seed: int = 0, val_per_task: int = 60, val_samples: int = 300,
              val_fraction: float = 0.2, include_path=None, columns: str | None = None) -> TrainingData:
    """The training data named by `spec` (see the module docstring); one GripbenchError line
    for anything that is none of them."""
    spec = (spec or "embedded").strip()
    if spec == "embedded":
        if columns:
            raise GripbenchError("--columns applies to a JSONL folder or a saved dataset, not the embedded suite")
        return EmbeddedData(seed, val_per_task)
    cols = parse_columns(columns)
    rows = dict(seed=seed, val_samples=val_samples, val_fraction=val_fraction)
    if spec.startswith("lmms:"):
        name, _, split = spec[len("lmms:"):].partition(":")
        if not name:
            raise GripbenchError(f"--data {spec}: expected lmms:TASK[:SPLIT]")
        return LmmsData(spec, name, split or None, include_path, **rows)
    for prefix in ("hf:", "jsonl:"):
        if spec.startswith(prefix) and _path_and_split(spec[len(prefix):]) is None:
            raise GripbenchError(f"--data {spec}: no such file or folder {spec[len(prefix):]!r}")
    found = _path_and_split(spec.removeprefix("hf:").removeprefix("jsonl:"))
    if found is not None:
        path, split = found
        if path.is_dir() and (path / "data.jsonl").is_file():
            path = path / "data.jsonl"
        if path.is_file() and path.suffix == ".jsonl":
            if split:
                raise GripbenchError(f"--data {spec}: a JSONL file has no splits; drop ':{split}'")
            return JsonlData(spec, path, cols, **rows)
        if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return DiskData(spec, path, split, cols, **rows)
        raise GripbenchError(f"--data {spec}: {path} is neither a .jsonl file, a folder with data.jsonl, nor a dataset "
                             "saved with datasets' save_to_disk")
    name, _, split = spec.partition(":")
    known = _task_names(name, include_path)
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, ["embedded", *known], n=2, cutoff=0.75)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise GripbenchError(f"--data {spec!r} is not 'embedded', an existing file or folder, or an lmms-eval task "
                             f"({hint}expected embedded, lmms:TASK[:SPLIT], a folder with data.jsonl, a .jsonl file, "
                             "or a save_to_disk folder)")
    return LmmsData(f"lmms:{spec}", name, split or None, include_path, **rows)


def _task_names(name: str, include_path) -> list[str]:
    """lmms-eval's task names (with the include paths), or none for what cannot be a name."""
    if not name or any(c in name for c in "/\\ ."):
        return []
    from gripbench.lmms.catalog import task_manager

    return list(task_manager(include_path).task_index)  # quiets lmms-eval's index logs
