"""lmms-eval integration: the `gripbench` model plugin and the embedded tasks, offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def include_path():
    from gripbench.lmms.tasks import materialize

    return str(materialize(["text", "counting"]))


def test_lmms_eval_matches_gripbench_own_evaluation(embedded, include_path):
    """The same method on the same questions: lmms-eval's exact match == gripbench's."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from gripbench.engine import Engine
    from gripbench.evaluate import accuracy, run_samples
    from gripbench.lmms.model import GripbenchLMM
    from gripbench.methods import create_method
    from gripbench.tasks.suite import load_split

    engine = Engine(*embedded)
    lm = GripbenchLMM(method="visionzip", budget=0.25, batch_size=8, engine=engine)
    tm = TaskManager(include_path=include_path, include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["gripbench_counting"], limit=24, task_manager=tm, batch_size=8)
    got = out["results"]["gripbench_counting"]["exact_match,none"]
    own = accuracy(run_samples(engine, load_split("counting", "test", 24), create_method("visionzip", budget=0.25)))
    assert got == pytest.approx(own)
    assert len(lm.records) == 24 and all(r["tokens_llm_input"] == 36 for r in lm.records)
    # the instance survives lmms-eval's clean-up and can run a second evaluation
    simple_evaluate(model=lm, tasks=["gripbench_counting"], limit=4, task_manager=tm, batch_size=8)


def test_lmms_eval_cli_runs_the_plugin_offline(include_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--model", "gripbench", "--model_args",
                        "method=fastv,budget=0.25", "--tasks", "gripbench_text", "--include_path", include_path,
                        "--limit", "8", "--batch_size", "8"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gripbench_text" in r.stdout and "exact_match" in r.stdout
