"""A sweep on a two-node Ray cluster that shares no disk with the driver (issue 7/7).

The cluster runs on this machine: a head node with no CPUs for tasks (so every cell runs on
the other node) and a worker node started in its own mount namespace with an empty tmpfs
over the folder that holds the driver's results, so the worker cannot see `--out` (nor a
scorer file kept beside it). Cells must come back to the driver, which alone writes them;
a cell that fails on the worker is one line and the others still land; a rerun retries only
what failed; accuracy and FLOPs equal the local executor's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="pip install 'gripbench[ray]'")

# a throwaway local cluster: no token authentication (a token file in ~/.ray would otherwise
# switch the head to token mode while joining nodes default to none), no usage reporting
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
ARGS = ["--tasks", "text", "--budgets", "1,0.5,0.25", "--limit", "8", "--batch-size", "8"]


def _can_hide(folder: Path) -> bool:
    """Whether this machine lets us mount a tmpfs in a private mount namespace (root, or
    unprivileged user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {folder} && test ! -e {folder}/probe"]
    (folder / "probe").write_text("")
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    finally:
        (folder / "probe").unlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep(out: Path, methods: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gripbench.cli", "sweep", "--methods", methods, *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture
def cluster(tmp_path):
    """(address, hidden folder): a head node without task CPUs and a 2-CPU worker node that
    sees an empty tmpfs where the driver sees `hidden`."""
    hidden = tmp_path / "driver-only"
    hidden.mkdir()
    if not _can_hide(hidden):
        pytest.skip("needs unshare and mount (root or user namespaces) to hide the results folder from the worker")
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="grb-ray-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env = {**os.environ, **CLUSTER_ENV}
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=0",
                    f"--temp-dir={temp / 'head'}", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=120)
    worker = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs tmpfs {hidden} && exec {ray_bin} start --address={address} "
         f"--num-cpus=2 --block --disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            status = subprocess.run([ray_bin, "status", f"--address={address}"], capture_output=True, text=True, env=env)
            if "2.0 CPU" in status.stdout or "0.0/2.0 CPU" in status.stdout:
                break
            assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
            time.sleep(1)
        else:
            pytest.fail(f"the worker node did not join: {status.stdout[-1000:]}")
        yield address, hidden
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_on_two_nodes_without_shared_disk(cluster, tmp_path):
    from gripbench.grip.method import WEIGHTS

    address, hidden = cluster
    env = {**os.environ, **CLUSTER_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_ADDRESS": address}
    local_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    scorer = hidden / "my-scorer.safetensors"  # on the driver's disk only
    shutil.copy(WEIGHTS / "grip.safetensors", scorer)
    out = hidden / "results"
    methods, extra = "none,random,grip", ["--method-args", f"grip:scorer={scorer}"]

    r = _sweep(out, methods, env, "--executor", "ray", *extra)
    # the grip cells fail on the worker (their scorer is not there): one line each, the others land
    assert r.returncode == 2, r.stderr[-3000:]
    failed = [line for line in r.stderr.splitlines() if line.startswith("cell failed:")]
    assert len(failed) == 2 and all(" grip " in line and f"no trained scorer at {scorer}" in line for line in failed), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "\x1b[" not in r.stderr
    assert "2 of 5 cells failed" in r.stderr.splitlines()[-1]
    cells = pd.read_parquet(out / "cells.parquet")
    assert sorted(zip(cells.method, cells.budget)) == [("none", 1.0), ("random", 0.25), ("random", 0.5)]
    assert (cells.torch_threads == 1).all() and cells.latency_concurrent.all()  # 2 one-CPU slots on the worker node
    assert cells.attention_kernel.str.startswith("sdpa:").all()
    landed = {p.name: p.stat().st_mtime_ns for p in (out / "cells.d").glob("*.parquet")}

    again = _sweep(out, methods, env, "--executor", "ray", *extra)  # resumes: only the two failed cells run again
    assert again.returncode == 2 and sum(line.startswith("cell failed:") for line in again.stderr.splitlines()) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells.d").glob("*.parquet")} == landed

    local = _sweep(tmp_path / "local", "none,random", local_env)
    assert local.returncode == 0, local.stderr[-2000:]
    a = pd.read_parquet(tmp_path / "local" / "cells.parquet").set_index("config_hash").sort_index()
    b = cells.set_index("config_hash").sort_index()
    assert list(a.index) == list(b.index)
    for column in ("accuracy", "flops_total", "tokens_llm_input", "evidence_recall"):
        assert (a[column] == b[column]).all(), column
    assert not a.latency_concurrent.any() and (a.torch_threads == a.torch_threads.iloc[0]).all()
