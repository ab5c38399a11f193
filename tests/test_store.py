"""The results store keeps every finished cell, and names a corrupt file."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import SYNTHETIC_IDENTITY

from gripbench.errors import GripbenchError
from gripbench.store import ResultsStore


def _cell(h: str, method: str = "none") -> dict:
    return {"config_hash": h, "model": "embedded", "task": "text", "method": method, "method_params": "{}",
            "budget": 1.0, "limit": 10, "seed": 0, "accuracy": 0.5, "n_samples": 2, **SYNTHETIC_IDENTITY}


def _samples() -> pd.DataFrame:
    return pd.DataFrame({"sample_id": ["a", "b"], "score": [1.0, 0.0], "unit": ["a", "b"], "stratum": "", "prediction": ["x", "y"],
                         "target": ["x", "x"], "kept_indices": [[0, 1], [2]]})


def test_cells_are_durable_and_merged(tmp_path):
    store = ResultsStore(tmp_path).create()
    store.add(_cell("h1"), _samples())
    store.add(_cell("h2", "fastv"), _samples())
    assert store.finished() == {"h1", "h2"}
    assert not (tmp_path / "cells.parquet").exists()  # merged once per command, not per cell
    store.consolidate()
    merged = pd.read_parquet(tmp_path / "cells.parquet")
    assert sorted(merged.config_hash) == ["h1", "h2"]
    assert len(pd.read_parquet(tmp_path / "samples.parquet")) == 4
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_row_without_samples_is_not_finished(tmp_path):
    store = ResultsStore(tmp_path).create()
    store.add(_cell("h1"), _samples())
    (tmp_path / "samples.d" / "h1.parquet").unlink()
    assert store.finished() == set()


def test_corrupt_file_is_named_and_nothing_is_lost(tmp_path):
    store = ResultsStore(tmp_path).create()
    store.add(_cell("h1"), _samples())
    bad = tmp_path / "cells.d" / "zz.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(GripbenchError, match="zz.parquet"):
        store.cells()
    assert (tmp_path / "cells.d" / "h1.parquet").exists() and bad.exists()


def test_foreign_parquet_is_rejected(tmp_path):
    store = ResultsStore(tmp_path).create()
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "cells.d" / "foreign.parquet")
    with pytest.raises(GripbenchError, match="not a gripbench results file"):
        store.cells()


def test_disk_errors_are_one_line_and_keep_the_previous_file(tmp_path, monkeypatch):
    """A full disk mid-write (or a read-only file system) leaves the previous file whole and
    no temporary file, and reaches the user as one line."""
    import errno

    import gripbench.store as st

    store = ResultsStore(tmp_path).create()
    store.add(_cell("h1"), _samples())
    store.consolidate()
    before = (tmp_path / "cells.parquet").read_bytes()

    def full(table, f, *a, **k):
        f.write(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.pq, "write_table", full)
    with pytest.raises(GripbenchError, match="the disk is full"):
        store.add(_cell("h2"), _samples())
    with pytest.raises(GripbenchError, match="the disk is full"):
        store.consolidate()
    assert (tmp_path / "cells.parquet").read_bytes() == before
    assert not list(tmp_path.rglob("*.tmp")) and store.finished() == {"h1"}
    monkeypatch.setattr(st.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    with pytest.raises(GripbenchError, match="read-only"):
        store.add(_cell("h3"), _samples())


def test_temporaries_of_live_writers_are_kept(tmp_path):
    import os

    from gripbench.store import clean_temporaries

    store = ResultsStore(tmp_path).create()
    live = tmp_path / "cells.d" / f".x.parquet.{os.getpid()}.abc.tmp"
    dead = tmp_path / "cells.d" / ".x.parquet.99999999.abc.tmp"
    live.write_bytes(b"")
    dead.write_bytes(b"")
    assert clean_temporaries(store.root) == 1 and live.exists() and not dead.exists()


def test_schema_is_documented_and_validated(tmp_path):
    """docs/results-schema.md is the schema module's own output; the store refuses a row that
    misses an identity column on write, and names an ill-typed column on read."""
    from pathlib import Path

    from gripbench import schema

    doc = Path(__file__).parent.parent / "docs" / "results-schema.md"
    assert doc.read_text().strip() == schema.markdown().strip(), "regenerate: python3 -m gripbench.schema > docs/results-schema.md"
    store = ResultsStore(tmp_path).create()
    row = {k: v for k, v in _cell("h1").items() if k != "model_sha256"}
    with pytest.raises(GripbenchError, match="missing column 'model_sha256'"):
        store.add(row, _samples())
    assert store.finished() == set()
    pd.DataFrame([{**_cell("h2"), "accuracy": "high"}]).to_parquet(tmp_path / "cells.d" / "h2.parquet")
    _samples().assign(config_hash="h2").to_parquet(tmp_path / "samples.d" / "h2.parquet")
    with pytest.raises(GripbenchError, match="column 'accuracy' should hold float"):
        store.cells()
