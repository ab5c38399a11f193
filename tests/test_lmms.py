"""lmms-eval integration: the `gripbench` model plugin and the embedded tasks, offline."""

from __future__ import annotations

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


# The CLI (`python -m lmms_eval eval --model gripbench ...`) is tested in tests/test_lmms_plugin.py.
