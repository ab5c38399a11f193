"""`gripbench sweep` end to end on a non-LLaVA family: a tiny random Qwen2.5-VL checkpoint
saved with `save_pretrained` (what a user's downloaded checkpoint is) on a local copy of
the stock POPE task, and the one-line refusals around it."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from gripbench.errors import GripbenchError
from gripbench.testing.families import build
from gripbench.testing.stock_tasks import write_stock_tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("family-sweep")
    model, processor = build("qwen2.5-vl")
    model.save_pretrained(base / "qwen")
    processor.save_pretrained(base / "qwen")
    write_stock_tasks(base / "tasks", n=4, tasks=("pope",))
    return base


def test_sweep_on_qwen_leaves_out_unfit_scorers_with_a_note(setup, capsys):
    from gripbench.sweep import run_sweep

    out = setup / "out"
    res = run_sweep(model=str(setup / "qwen"), methods="all", tasks="local_pope", budgets="0.5", limit=4, out=out,
                    batch_size=4, progress=False, include_path=[str(setup / "tasks")])
    err = capsys.readouterr().err
    for name in ("grip", "grip-warmup", "dynamicvit"):  # shipped scorers are for the embedded model (hidden 192)
        assert f"--methods all: leaving out {name}: the scorer at" in err
    cells = pd.read_parquet(out / "cells.parquet")
    assert res.ran == len(cells) and not {"grip", "grip-warmup", "dynamicvit"} & set(cells["method"])
    assert {"none", "random", "fastv", "sparsevlm", "visionzip", "pool", "divprune"} <= set(cells["method"])
    # Qwen2.5-VL's merged 2x2 tokens: the budget is per row, on the row's own token count
    none = cells[cells["method"] == "none"].iloc[0]
    rand = cells[cells["method"] == "random"].iloc[0]
    assert rand["tokens_llm_input"] == pytest.approx(round(0.5 * none["tokens_llm_input"]), abs=0.5)
    assert rand["flops_llm_prefill"] < none["flops_llm_prefill"] and rand["flops_vision"] == none["flops_vision"] > 0


def test_a_named_unfit_method_stops_the_sweep_before_writing(setup):
    from gripbench.sweep import run_sweep

    out = setup / "named"
    with pytest.raises(GripbenchError, match="trained for hidden size 192, the model has 64"):
        run_sweep(model=str(setup / "qwen"), methods="grip", tasks="local_pope", budgets="0.5", limit=2, out=out,
                  progress=False, include_path=[str(setup / "tasks")])
    assert not out.exists()


def test_unsupported_family_is_one_line(tmp_path):
    """InternVL / Gemma3 / SmolVLM have no adapter yet: refused from the config alone."""
    from transformers import Gemma3Config

    Gemma3Config().save_pretrained(tmp_path / "gemma3")
    out = subprocess.run([sys.executable, "-m", "gripbench.cli", "sweep", "--model", str(tmp_path / "gemma3"),
                          "--methods", "none", "--tasks", "attribute", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "class Gemma3ForConditionalGeneration is not supported (supported: " in lines[0]
    assert "Qwen2_5_VLForConditionalGeneration" in lines[0] and not (tmp_path / "o").exists()
    assert json.loads((tmp_path / "gemma3" / "config.json").read_text())["model_type"] == "gemma3"
