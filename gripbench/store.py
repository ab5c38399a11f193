"""The results store: a folder that never loses a finished cell.

Layout (docs/results-schema.md, defined in gripbench/schema.py): `cells.parquet` (one row per sweep cell), `samples.parquet` (one row
per sample per cell) and `manifest.json`, plus `cells.d/<config_hash>.parquet` and
`samples.d/<config_hash>.parquet`, one pair per finished cell. The per-cell files are the
truth; the merged files are rebuilt from them (`consolidate`) at the end of every
successful sweep, so after any successful command they hold exactly the finished cells,
even if an earlier sweep was killed while merging.

Durability: a cell is written to a temporary file in the same folder, fsync'ed and
renamed into `cells.d/` (rename is atomic on POSIX), samples first and the cell row
last, so a cell row on disk always has its samples, and a cell counts as finished only
when both files exist. A sweep killed at any instant leaves only whole files; two sweeps
writing one folder at once each add their own cell files and never edit another's.
Temporary files carry their writer's pid and are removed once that process is gone.
A cell computed by code, weights or data that have since changed (see
`gripbench.provenance`) stays readable in `cells.d/` until its recomputation lands; it then
moves to `stale.d/` (nothing is deleted).
A corrupt or foreign parquet file is reported by name and nothing is deleted.

A sweep writes only into a folder that is new, empty, or a gripbench results folder: a
folder holding merged results without per-cell files (a committed reference, results
copied from elsewhere) is imported into per-cell files first, so nothing in it is lost;
any other folder is refused.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gripbench import schema
from gripbench.errors import GripbenchError

CELLS, SAMPLES, MANIFEST, STALE = "cells.d", "samples.d", "manifest.json", "stale.d"
MERGED_CELLS, MERGED_SAMPLES = "cells.parquet", "samples.parquet"


def disk_error(e: OSError, what: str) -> GripbenchError:
    """One line for a filesystem failure (read-only, full, permission, a file in the way)."""
    reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.ENOTDIR: "a path component is a file, not a folder",
              errno.EEXIST: "a file is in the way"}.get(e.errno, e.strerror or str(e))
    return GripbenchError(f"cannot write {what}: {reason}" + (f" ({e.filename})" if e.filename else ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, write) -> None:
    """Write `path` through `write(binary_file)` into a temporary file beside it, fsync, rename.
    On any failure (a full disk included) the previous file is untouched and the temporary
    file removed. The temporary name carries the pid, so `clean_temporaries` can tell a live
    writer's file from a dead one's."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would create it, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_table(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f))


def clean_temporaries(folder: Path) -> int:
    """Remove temporary files left by writers that no longer run; returns how many."""
    removed = 0
    for p in list(folder.glob(".*.tmp")) + list(folder.glob("*/.*.tmp")):
        parts = p.name.rsplit(".", 3)  # .<name>.<pid>.<random>.tmp
        try:
            pid = int(parts[-3])
        except (IndexError, ValueError):
            pid = -1
        if pid <= 0 or not _pid_alive(pid):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _read(path: Path, columns: tuple[schema.Column, ...]) -> pd.DataFrame:
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as e:  # pyarrow raises several types for truncated/garbage files
        raise GripbenchError(f"corrupt results file {path}: {str(e).splitlines()[0]}") from None
    df = schema.upgrade(df, columns)
    schema.validate(df, columns, str(path))
    return df


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- opening for writing --------------------------------------------------------------
    def check_writable(self) -> list[str]:
        """Refuse a folder this store may not write into, before anything is written. Returns
        what must happen first: ["import"] for merged results without per-cell files."""
        root = self.root
        for parent in [root, *root.parents]:
            if parent.exists():
                if not parent.is_dir():
                    raise GripbenchError(f"--out {root}: {parent} is a file, not a folder")
                if not os.access(parent, os.W_OK):
                    raise GripbenchError(f"--out {root}: cannot write into {parent} (read-only or no permission)")
                break
        if not root.is_dir():
            return []
        entries = [p.name for p in root.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))]
        if not entries or (root / CELLS).is_dir():
            return []
        if (root / MERGED_CELLS).exists():
            self._merged_cells(), self._merged_samples()  # foreign or corrupt: one line naming the file
            return ["import"]
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise GripbenchError(f"--out {root} holds files gripbench did not write ({shown}); "
                             "choose a new or empty folder, or a gripbench results folder to resume")

    def create(self) -> ResultsStore:
        """Make the folder ready for cells: per-cell folders, merged-only results imported,
        dead writers' temporary files removed. Call `check_writable` first to fail early."""
        todo = self.check_writable()
        try:
            (self.root / CELLS).mkdir(parents=True, exist_ok=True)
            (self.root / SAMPLES).mkdir(parents=True, exist_ok=True)
            clean_temporaries(self.root)
            if "import" in todo:
                self._import_merged()
        except OSError as e:
            raise disk_error(e, f"results folder {self.root}") from None
        return self

    def _import_merged(self) -> None:
        """Split merged `cells.parquet` / `samples.parquet` into per-cell files (samples first)."""
        cells, samples = self._merged_cells(), self._merged_samples()
        by_hash = dict(tuple(samples.groupby("config_hash", sort=False)))
        for _, row in cells.iterrows():
            h = row["config_hash"]
            if h in by_hash:
                _write_table(pa.Table.from_pandas(by_hash[h], preserve_index=False), self.root / SAMPLES / f"{h}.parquet")
            _write_table(pa.Table.from_pandas(pd.DataFrame([row]), preserve_index=False), self.root / CELLS / f"{h}.parquet")

    # ---- writing --------------------------------------------------------------------------
    def finished(self) -> set[str]:
        """config_hash of every cell whose row and samples are both on disk."""
        cells = {p.stem for p in (self.root / CELLS).glob("*.parquet")}
        samples = {p.stem for p in (self.root / SAMPLES).glob("*.parquet")}
        return cells & samples

    def add(self, cell: dict, samples: pd.DataFrame) -> None:
        """Persist one finished cell: samples first, then the row (a row on disk always has its
        samples). The merged files are rebuilt by `consolidate`, once per command."""
        h = cell["config_hash"]
        row = pd.DataFrame([cell])
        schema.validate(row, schema.CELL, f"cell {h}", write=True)
        schema.validate(samples.assign(config_hash=h), schema.SAMPLE, f"samples of cell {h}", write=True)
        try:
            _write_table(pa.Table.from_pandas(samples.assign(config_hash=h), preserve_index=False),
                         self.root / SAMPLES / f"{h}.parquet")
            _write_table(pa.Table.from_pandas(row, preserve_index=False), self.root / CELLS / f"{h}.parquet")
        except OSError as e:
            raise disk_error(e, f"cell {h} into {self.root}") from None

    def consolidate(self) -> None:
        """Rebuild the merged files from the finished per-cell files (samples first)."""
        if not (self.root / CELLS).is_dir():
            return
        done = self.finished()
        if not done:
            return
        cells = self.cells().sort_values(["model", "task", "method", "budget"], kind="stable")
        try:
            _write_table(pa.Table.from_pandas(self.samples(), preserve_index=False), self.root / MERGED_SAMPLES)
            _write_table(pa.Table.from_pandas(cells, preserve_index=False), self.root / MERGED_CELLS)
            clean_temporaries(self.root)
        except OSError as e:
            raise disk_error(e, f"merged results in {self.root}") from None

    def existing_cells(self) -> pd.DataFrame:
        """The finished cells already in the folder (validated), or an empty frame for a new one."""
        if (self.root / CELLS).is_dir() and self.finished():
            self.samples()  # a corrupt samples file stops here too, naming it
            return self.cells()
        if (self.root / MERGED_CELLS).exists():
            self._merged_samples()
            return self._merged_cells()
        return pd.DataFrame(columns=[c.name for c in schema.CELL if c.required])

    def retire(self, config_hash: str) -> None:
        """Move a cell that a recomputed one replaced into `stale.d/` (kept, never deleted):
        the row first, so the cell stops counting as finished before its samples leave."""
        try:
            for folder in (CELLS, SAMPLES):
                src = self.root / folder / f"{config_hash}.parquet"
                if src.exists():
                    dst = self.root / STALE / folder / src.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
        except OSError as e:
            raise disk_error(e, f"stale cell {config_hash} in {self.root}") from None

    def write_manifest(self, manifest: dict) -> None:
        try:
            atomic_write(self.root / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))
        except OSError as e:
            raise disk_error(e, f"{self.root / MANIFEST}") from None

    def manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise GripbenchError(f"corrupt manifest {path}: {e}") from None
        if not isinstance(data, dict):
            raise GripbenchError(f"corrupt manifest {path}: not a JSON object")
        return data

    # ---- reading --------------------------------------------------------------------------
    def _merged_cells(self) -> pd.DataFrame:
        return _read(self.root / MERGED_CELLS, schema.CELL)

    def _merged_samples(self) -> pd.DataFrame:
        path = self.root / MERGED_SAMPLES
        if not path.exists():
            raise GripbenchError(f"{self.root} has {MERGED_CELLS} but no {MERGED_SAMPLES}")
        return _read(path, schema.SAMPLE)

    def _per_cell(self) -> bool:
        return (self.root / CELLS).is_dir() and any((self.root / CELLS).glob("*.parquet"))

    def cells(self) -> pd.DataFrame:
        """All finished cells (per-cell files where present, else the merged file)."""
        if not self._per_cell():
            if not (self.root / MERGED_CELLS).exists():
                raise GripbenchError(f"{self.root} holds no gripbench results (no {MERGED_CELLS})")
            return self._merged_cells()
        done = self.finished()
        rows = [_read(p, schema.CELL) for p in sorted((self.root / CELLS).glob("*.parquet"))]  # every file is checked
        rows = [r for r in rows if set(r["config_hash"]) <= done]  # a row whose samples are not on disk is unfinished
        if not rows:
            raise GripbenchError(f"{self.root} holds no finished cells")
        return pd.concat(rows, ignore_index=True)

    def samples(self) -> pd.DataFrame:
        """All per-sample rows of the finished cells."""
        if not self._per_cell():
            return self._merged_samples()
        done = self.finished()
        files = sorted(p for p in (self.root / SAMPLES).glob("*.parquet") if p.stem in done)
        return pd.concat([_read(p, schema.SAMPLE) for p in files], ignore_index=True)
