"""The command line: help, listings, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "gripbench.cli", *args], capture_output=True, text=True)


def test_help():
    r = run("--help")
    assert r.returncode == 0
    assert all(cmd in r.stdout for cmd in ("sweep", "tasks", "methods", "zoo", "train", "eval"))


def test_tasks_lists_five_tasks():
    r = run("tasks")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.strip().splitlines()]
    assert names == ["attribute", "existence", "counting", "spatial", "text"]


def test_zoo_path_is_the_shipped_folder():
    from gripbench.zoo import embedded_path

    r = run("zoo", "path")
    assert r.returncode == 0 and r.stdout.strip() == str(embedded_path())


def test_methods_lists_every_registered_method():
    from gripbench.methods import registry

    r = run("methods")
    assert r.returncode == 0
    listed = [line.split()[0] for line in r.stdout.strip().splitlines()]
    assert listed == registry().names()
    assert {"none", "random", "pool", "attention-score", "fastv", "sparsevlm", "visionzip", "divprune"} <= set(listed)


def test_methods_on_a_model_print_reach_and_plan():
    """`methods --model`: FastV's floor on the 8-layer embedded model is its two full layers
    (K = 2) plus one token after them; pre-LLM methods reach 1/N; K is checked against depth."""
    r = run("methods", "--model", "embedded")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:]}
    assert rows["fastv"][1:4] == ["layer_avg", f"{(2 * 144 + 6) / (8 * 144):.4f}", "2:"]
    assert rows["random"][1:5] == ["llm_input", f"{1 / 144:.4f}", "0:", "36"]
    assert rows["none"][2] == "1.0000"
    r = run("methods", "--model", "embedded", "--method-args", "fastv:K=9")
    assert r.returncode == 2 and "must be below the model's 8 LLM layers" in r.stderr


def test_embedded_qwen_is_a_model_name():
    """`--model embedded-qwen` names the second embedded model: until its checkpoint is in the
    install, one line saying how to build it; a typo gets a did-you-mean."""
    from gripbench.zoo import EMBEDDED

    r = run("eval", "--model", "embedded-qwen", "--limit", "1", "--tasks", "text")
    if (EMBEDDED["embedded-qwen"] / "config.json").exists():
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode == 2 and "zoo build --family qwen2-vl" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("eval", "--model", "embeded-qwen", "--limit", "1")
    assert r.returncode == 2 and "did you mean 'embedded-qwen'" in r.stderr
    r = run("zoo", "build", "--family", "llava")
    assert r.returncode == 2 and "give --out" in r.stderr


def test_unknown_method_says_did_you_mean():
    r = run("eval", "--method", "fastvv", "--limit", "1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'fastv'" in r.stderr


def test_unknown_task_and_bad_budget():
    r = run("eval", "--tasks", "countng", "--limit", "1")
    assert r.returncode == 2 and "did you mean 'counting'" in r.stderr
    r = run("eval", "--budget", "1.5", "--limit", "1")
    assert r.returncode == 2 and "outside (0, 1]" in r.stderr and "Traceback" not in r.stderr
    r = run("eval", "--budget", "0", "--limit", "1")
    assert r.returncode == 2


def test_unknown_model():
    r = run("eval", "--model", "nonexistent-model", "--limit", "1")
    assert r.returncode == 2 and "unknown model" in r.stderr
