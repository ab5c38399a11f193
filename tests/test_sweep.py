"""The sweep: resumable after SIGKILL, safe with two writers, clear errors on bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

ARGS = ["--methods", "none,random", "--tasks", "text", "--budgets", "1,0.5,0.25", "--limit", "8", "--batch-size", "8"]
N_CELLS = 3  # none@1 and random@{0.5, 0.25}: none@1 is random@1 (see sweep.plan)


def sweep(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "gripbench.cli", "sweep", *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_killed_sweep_resumes_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIPBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = sweep(out, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((out / "cells.d").glob("*.parquet"))) < 1:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # mid-sweep, possibly mid-write
    proc.wait()
    first = {p.name for p in (out / "cells.d").glob("*.parquet")}
    assert 1 <= len(first) < N_CELLS
    r = sweep(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{N_CELLS - len(first)} cells run, {len(first)} already finished" in r.stdout
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == N_CELLS and cells.config_hash.is_unique
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 8 * N_CELLS and not samples.duplicated(["config_hash", "sample_id"]).any()
    assert {p.name for p in (out / "cells.d").glob("*.parquet")} >= first  # nothing finished was lost
    r = sweep(out)
    assert f"0 cells run, {N_CELLS} already finished" in r.stdout


def test_plan_runs_budget_one_once_through_none():
    from gripbench.sweep import plan

    cells = plan("embedded", "none,random", "text", [1, 0.5], 8, 0)
    assert [(c.method, c.budget) for c in cells] == [("none", 1.0), ("random", 0.5)]
    alone = plan("embedded", "random", "text,counting", [1, 0.5], 8, 0)  # no `none` cell to stand in: it runs
    assert [(c.task, c.method, c.budget) for c in alone] == [(t, "random", b) for t in ("gripbench_text", "gripbench_counting")
                                                             for b in (1.0, 0.5)]


def test_two_sweeps_into_one_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIPBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "shared"
    a, b = sweep(out, wait=False), sweep(out, "--seed", "1", wait=False)
    assert a.wait(timeout=900) == 0 and b.wait(timeout=900) == 0
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == 2 * N_CELLS and set(cells.seed) == {0, 1}
    assert not list(out.rglob("*.tmp"))


def test_corrupt_results_file_is_named_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIPBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    (out / "cells.d").mkdir(parents=True)
    (out / "samples.d").mkdir()
    (out / "cells.d" / "bad.parquet").write_bytes(b"garbage")
    (out / "samples.d" / "bad.parquet").write_bytes(b"garbage")
    r = sweep(out)
    assert r.returncode == 2 and "bad.parquet" in r.stderr and r.stderr.strip().count("\n") == 0
    assert (out / "cells.d" / "bad.parquet").read_bytes() == b"garbage"


@pytest.mark.parametrize("args,message", [
    (["--methods", "fastvv"], "did you mean 'fastv'"),
    (["--tasks", "countng"], "did you mean 'counting'"),
    (["--budgets", "0,0.5"], "outside (0, 1]"),
])
def test_bad_input_exits_2(tmp_path, args, message):
    cmd = [sys.executable, "-m", "gripbench.cli", "sweep", "--out", str(tmp_path / "x"), "--limit", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_ray_executor_matches_local(tmp_path, monkeypatch):
    """Each cell a Ray task on a local Ray instance, writing into one store: same cells and
    the same accuracies as the local executor."""
    pytest.importorskip("ray", reason="pip install 'gripbench[ray]'")
    monkeypatch.setenv("GRIPBENCH_CACHE", str(tmp_path / "cache"))
    local = sweep(tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    r = sweep(tmp_path / "ray", "--executor", "ray")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{N_CELLS} cells run" in r.stdout
    a = pd.read_parquet(tmp_path / "local" / "cells.parquet").set_index("config_hash").sort_index()
    b = pd.read_parquet(tmp_path / "ray" / "cells.parquet").set_index("config_hash").sort_index()
    assert list(a.index) == list(b.index)
    assert (a["accuracy"] == b["accuracy"]).all() and (a["flops_total"] == b["flops_total"]).all()


def test_ray_missing_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    from gripbench.errors import GripbenchError
    from gripbench.sweep import Cell, run_on_ray

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "ray" else real(name, *a, **k))
    with pytest.raises(GripbenchError, match=r"pip install 'gripbench\[ray\]'"):
        run_on_ray("embedded", [Cell("embedded", "gripbench_text", "none", 1.0, 2, 0)], tmp_path, 8)
