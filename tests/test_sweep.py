"""The sweep: resumable after SIGKILL, safe with two writers, clear errors on bad input."""

from __future__ import annotations

import json
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
    if not wait:  # SIGINT as a terminal delivers it, even where this test runs in the background (which ignores it)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def started_with_one_cell(out):
    """A sweep in the background, returned once its first cell is on disk."""
    proc = sweep(out, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((out / "cells.d").glob("*.parquet"))) < 1:
        assert proc.poll() is None, proc.stderr.read()[-2000:]  # it died before its first cell: say why, now
        time.sleep(0.2)
    return proc


def test_killed_sweep_resumes_without_duplicates(tmp_path):
    out = tmp_path / "run"
    proc = started_with_one_cell(out)
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


def test_two_sweeps_into_one_folder(tmp_path):
    out = tmp_path / "shared"
    a, b = sweep(out, wait=False), sweep(out, "--seed", "1", wait=False)
    assert a.wait(timeout=900) == 0 and b.wait(timeout=900) == 0
    cells = pd.read_parquet(out / "cells.parquet")
    assert len(cells) == 2 * N_CELLS and set(cells.seed) == {0, 1}
    assert not list(out.rglob("*.tmp"))


def test_corrupt_results_file_is_named_and_kept(tmp_path):
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
    (["--executor", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell must be at least 1"),
])
def test_bad_input_exits_2(tmp_path, args, message):
    cmd = [sys.executable, "-m", "gripbench.cli", "sweep", "--out", str(tmp_path / "x"), "--limit", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_ray_missing_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    from gripbench.errors import GripbenchError
    from gripbench.sweep import Cell, run_on_ray

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "ray" else real(name, *a, **k))
    with pytest.raises(GripbenchError, match=r"pip install 'gripbench\[ray\]'"):
        run_on_ray("embedded", [Cell("embedded", "gripbench_text", "none", 1.0, 2, 0)], 8, land=None)


def test_plan_drops_duplicated_budgets_and_tasks():
    from gripbench.sweep import plan

    cells = plan("embedded", "random", "text,text", "0.5,0.5,0.25", 8, 0)
    assert [(c.task, c.budget) for c in cells] == [("gripbench_text", 0.5), ("gripbench_text", 0.25)]


def _one_line_error(capsys, argv, message):
    from gripbench.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--budgets", "abc"], "'abc' is not a number"),
    (["--budgets", ""], "an empty item"),
    (["--budgets", "0.5,,0.25"], "an empty item"),
    (["--budgets", "nan"], "outside (0, 1]"),
    (["--tasks", ""], "--tasks is empty"),
    (["--methods", ","], "--methods is empty"),
    (["--model", "embeded"], "did you mean 'embedded'"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "x"
    _one_line_error(capsys, ["sweep", "--out", str(out), "--tasks", "text", "--limit", "2", *extra], message)
    assert not out.exists()


def test_bad_model_folders_are_one_line(tmp_path, capsys):
    import shutil

    from gripbench.zoo import embedded_path

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    _one_line_error(capsys, ["sweep", "--model", str(junk), "--out", str(tmp_path / "a")], "holds no config.json")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(embedded_path(), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\0garbage" * 100)
    _one_line_error(capsys, ["sweep", "--model", str(corrupt), "--tasks", "text", "--limit", "2",
                             "--out", str(tmp_path / "b")], "cannot load model")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_out_under_a_file_and_foreign_folders_are_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(capsys, ["sweep", "--tasks", "text", "--limit", "2", "--out", str(f / "sub")], "is a file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    _one_line_error(capsys, ["sweep", "--tasks", "text", "--limit", "2", "--out", str(foreign)], "did not write")
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"] and (foreign / "thesis.tex").read_text() == "precious"


def test_a_merged_results_folder_is_imported_not_replaced(tmp_path):
    """The committed reference holds merged files only: a sweep into a copy of it adds its
    cell to them instead of replacing 105 cells with 1 (which it did)."""
    import shutil
    from pathlib import Path

    ref = Path(__file__).parent.parent / "results" / "reference"
    out = tmp_path / "ref"
    out.mkdir()
    for name in ("cells.parquet", "samples.parquet", "manifest.json"):
        shutil.copy(ref / name, out / name)
    before_cells, before_samples = pd.read_parquet(out / "cells.parquet"), pd.read_parquet(out / "samples.parquet")
    r = subprocess.run([sys.executable, "-m", "gripbench.cli", "sweep", "--methods", "none", "--tasks", "text",
                        "--limit", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    after_cells, after_samples = pd.read_parquet(out / "cells.parquet"), pd.read_parquet(out / "samples.parquet")
    assert len(after_cells) == len(before_cells) + 1 and len(after_samples) == len(before_samples) + 4
    assert set(before_cells.config_hash) < set(after_cells.config_hash)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["runs"]) == 2 and manifest["runs"][0]["command"] == json.loads((ref / "manifest.json").read_text())["command"]


def test_merged_files_are_repaired_and_temporaries_removed(tmp_path):
    """A sweep killed while merging left cells.parquet with fewer cells than the per-cell
    store and a temporary file; the next command, with nothing to run, repairs both."""
    out = tmp_path / "run"
    assert sweep(out).returncode == 0
    full = pd.read_parquet(out / "cells.parquet")
    full.iloc[:1].to_parquet(out / "cells.parquet")  # the merge that was cut short
    (out / ".cells.parquet.99999999.x.tmp").write_bytes(b"half a file")  # its writer (a dead pid) left this
    r = sweep(out)
    assert r.returncode == 0 and f"0 cells run, {N_CELLS} already finished" in r.stdout
    repaired = pd.read_parquet(out / "cells.parquet")
    assert sorted(repaired.config_hash) == sorted(full.config_hash)
    assert len(pd.read_parquet(out / "samples.parquet")) == 8 * N_CELLS
    assert not list(out.rglob("*.tmp"))


def test_failed_command_leaves_the_folder_untouched(tmp_path):
    out = tmp_path / "run"
    assert sweep(out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = sweep(out, "--model", "embeded")
    assert r.returncode == 2 and "did you mean 'embedded'" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_ctrl_c_exits_130_and_keeps_finished_cells(tmp_path):
    out = tmp_path / "run"
    proc = started_with_one_cell(out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    finished = {p.stem for p in (out / "cells.d").glob("*.parquet")}
    assert set(pd.read_parquet(out / "cells.parquet").config_hash) == finished  # merged on the way out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "interrupted"


def test_manifest_records_versions_and_every_run(tmp_path):
    out = tmp_path / "run"
    assert sweep(out, "--budgets", "1").returncode == 0
    assert sweep(out).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["finished", "finished"]
    assert [r["cells_run"] for r in manifest["runs"]] == [1, N_CELLS - 1]
    assert set(manifest["versions"]) == {"torch", "transformers", "lmms-eval", "datasets", "tokenizers", "numpy", "pillow"}
    assert isinstance(manifest["lock_match"], bool)
    cells = pd.read_parquet(out / "cells.parquet")
    assert (cells["peak_memory_bytes"] > 0).all() and cells["latency_ratio_runs"].map(len).eq(5).all()


def _plugin(root, mark: int):
    """A third-party method installed beside gripbench: a module and its distribution's
    entry point on PYTHONPATH. `mark` edits its source without changing what it does."""
    root.mkdir(exist_ok=True)
    (root / "plugdemo.py").write_text(f'from baselines.random import RandomPruning\n\n\nclass Plug(RandomPruning):\n'
                                      f'    """random pruning, as a plugin"""\n\n    MARK = {mark}\n')
    dist = root / "plugdemo-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugdemo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[gripbench.methods]\nplug-random = plugdemo:Plug\n")
    return {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_cells_of_changed_method_code_are_stale_and_recomputed(tmp_path):
    """Edit a method's code and rerun into the same folder: its cells are stale (said per kind
    of change), recomputed, the old ones kept in stale.d/; --keep-stale reuses them and says
    so; reverting the edit gives the original numbers back."""
    out, plug = tmp_path / "run", tmp_path / "plug"
    args = [sys.executable, "-m", "gripbench.cli", "sweep", "--methods", "plug-random", "--tasks", "text",
            "--budgets", "0.5,0.25", "--limit", "4", "--batch-size", "4", "--out", str(out)]

    def run(mark, *extra):
        r = subprocess.run([*args, *extra], capture_output=True, text=True, env=_plugin(plug, mark), timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    run(1)
    first = pd.read_parquet(out / "cells.parquet").set_index("budget").sort_index()
    assert set(first.method_distribution) == {"plugdemo"} and set(first.method_version) == {"0.1"}
    r = run(2)
    assert "2 stale cells: method code (plug-random); rerun" in r.stderr
    assert "2 cells run, 0 already finished (2 stale recomputed)" in r.stdout
    assert len(list((out / "stale.d" / "cells.d").glob("*.parquet"))) == 2
    second = pd.read_parquet(out / "cells.parquet").set_index("budget").sort_index()
    assert len(second) == 2 and not set(second.config_hash) & set(first.config_hash)
    r = run(3, "--keep-stale")
    assert "2 stale cells: method code (plug-random); reused (--keep-stale)" in r.stderr and "0 cells run" in r.stdout
    assert len(json.loads((out / "manifest.json").read_text())["kept_stale"]) == 2
    r = run(1)  # the original code again: recomputed, and the same numbers as the first time
    assert "2 cells run" in r.stdout
    again = pd.read_parquet(out / "cells.parquet").set_index("budget").sort_index()
    assert list(again.config_hash) == list(first.config_hash)
    assert list(again.accuracy) == list(first.accuracy) and list(again.flops_total) == list(first.flops_total)


def test_resume_state_names_each_kind_of_change():
    from gripbench.sweep import Cell, resume_state

    ident = {"method_distribution": "gripbench", "method_version": "0.1.0", "method_source_sha256": "a",
             "model_sha256": "m", "task_sha256": "t", "code_sha256": "c"}
    cells = [Cell("embedded", "gripbench_text", "fastv", b, 8, 0, identity=json.dumps(ident)) for b in (0.5, 0.25)]
    rows = [{**c.record(), **ident} for c in cells]
    rows[0].update(model_sha256="m-old", config_hash="old0")
    rows[1] = {k: v for k, v in rows[1].items() if k not in ident} | {"config_hash": "old1"}  # written by the landed main
    state = resume_state(cells, pd.DataFrame(rows))
    assert state.done == set() and set(state.stale) == {"old0", "old1"}
    assert state.reasons == {"model weights": 1, "written before cell identity was recorded (schema 1)": 1}
    assert resume_state(cells, pd.DataFrame([{**c.record()} for c in cells])).done == {c.config_hash for c in cells}


def test_a_ray_error_is_one_plain_line():
    from gripbench.sweep import attention_kernel, one_line

    remote = RuntimeError("\x1b[36mray::_ray_cell()\x1b[39m (pid=1, ip=10.0.0.2)\n  File \"x.py\", line 1\nboom")
    assert one_line(remote) == "RuntimeError: ray::_ray_cell() (pid=1, ip=10.0.0.2)"
    assert one_line(ValueError()) == "ValueError: (no message)"
    assert attention_kernel("sdpa", {"causal": 48}) == "sdpa:causal"
    assert attention_kernel("sdpa", {"masked": 8}) == "sdpa:masked"
    assert attention_kernel("eager", {"causal": 3, "masked": 5}) == "eager:mixed (3/8 causal)"
