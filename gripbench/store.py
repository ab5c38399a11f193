"""The results store: a folder that never loses a finished cell.

Layout (design.md): `cells.parquet` (one row per sweep cell), `samples.parquet` (one row
per sample per cell) and `manifest.json`, plus `cells.d/<config_hash>.parquet` and
`samples.d/<config_hash>.parquet`, one pair per finished cell.

Durability: a cell is written to a temporary file in the same folder, fsync'ed and
renamed into `cells.d/` (rename is atomic on POSIX), samples first and the cell row
last, so a cell row on disk always has its samples. The consolidated `cells.parquet` /
`samples.parquet` are rebuilt from the per-cell files the same way after every cell.
A sweep killed at any instant leaves only whole files; two sweeps writing one folder at
once each add their own cell files and never edit another's. A stray temporary file is
ignored; a corrupt or foreign parquet file is reported by name and nothing is deleted.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gripbench.errors import GripbenchError

CELLS, SAMPLES = "cells.d", "samples.d"
IDENTITY = ["model", "task", "method", "method_params", "budget", "limit", "seed"]


def _atomic_write(table: pa.Table, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as e:  # pyarrow raises several types for truncated/garbage files
        raise GripbenchError(f"corrupt results file {path}: {str(e).splitlines()[0]}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise GripbenchError(f"{path} is not a gripbench results file (missing columns: {', '.join(missing)})")
    return df


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def create(self) -> ResultsStore:
        if self.root.exists() and not self.root.is_dir():
            raise GripbenchError(f"--out {self.root} exists and is not a folder")
        (self.root / CELLS).mkdir(parents=True, exist_ok=True)
        (self.root / SAMPLES).mkdir(parents=True, exist_ok=True)
        return self

    def finished(self) -> set[str]:
        """config_hash of every cell whose row and samples are both on disk."""
        cells = {p.stem for p in (self.root / CELLS).glob("*.parquet")}
        samples = {p.stem for p in (self.root / SAMPLES).glob("*.parquet")}
        return cells & samples

    def add(self, cell: dict, samples: pd.DataFrame) -> None:
        """Persist one finished cell (samples first, then the row), then refresh the merged files."""
        h = cell["config_hash"]
        _atomic_write(pa.Table.from_pandas(samples.assign(config_hash=h), preserve_index=False),
                      self.root / SAMPLES / f"{h}.parquet")
        _atomic_write(pa.Table.from_pandas(pd.DataFrame([cell]), preserve_index=False), self.root / CELLS / f"{h}.parquet")
        self.consolidate()

    def _load(self, folder: str, merged: str, required: list[str], what: str) -> pd.DataFrame:
        """Rows from the per-cell files in `folder`, or from `merged` for a folder without them."""
        files = sorted((self.root / folder).glob("*.parquet"))
        if not files:
            path = self.root / merged
            if not path.exists():
                raise GripbenchError(f"{self.root} holds no gripbench {what} (no {merged})")
            return _read(path, required)
        return pd.concat([_read(p, required) for p in files], ignore_index=True)

    def cells(self) -> pd.DataFrame:
        """All finished cells."""
        return self._load(CELLS, "cells.parquet", ["config_hash", *IDENTITY, "accuracy"], "results")

    def samples(self) -> pd.DataFrame:
        """All per-sample rows."""
        return self._load(SAMPLES, "samples.parquet", ["config_hash", "sample_id", "correct"], "per-sample results")

    def consolidate(self) -> None:
        cells = self.cells().sort_values(["model", "task", "method", "budget"], kind="stable")
        _atomic_write(pa.Table.from_pandas(cells, preserve_index=False), self.root / "cells.parquet")
        _atomic_write(pa.Table.from_pandas(self.samples(), preserve_index=False), self.root / "samples.parquet")

    def write_manifest(self, manifest: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        os.replace(tmp, self.root / "manifest.json")
