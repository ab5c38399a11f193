"""Stock lmms-eval benchmarks through the sweep, each scored by its own metric.

Tiny local copies of eight stock tasks in their exact schemas (`gripbench.testing.stock_tasks`,
loaded through copies of the stock YAMLs pointed at local parquet, passed with --include-path)
run through `run_sweep` on the embedded model. Each cell's numbers are compared with an
independent lmms-eval evaluation of the same method on the same questions: the aggregate,
and each sample's score as the task's own `process_results` gives it. (The embedded model was
trained on gripbench's procedural questions, not on these prompts, so most of its answers
here are wrong: tests/test_stock_tasks.py checks the same reader on replies of known,
non-trivial correctness.)
"""

from __future__ import annotations

import pandas as pd
import pytest

from gripbench.errors import GripbenchError
from gripbench.testing.stock_tasks import STOCK, write_stock_tasks

pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
N = 8


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock") / "tasks"
    return root, write_stock_tasks(root, n=N)


@pytest.fixture(scope="module")
def swept(stock, tmp_path_factory):
    from gripbench.sweep import run_sweep

    root, names = stock
    out = tmp_path_factory.mktemp("sweep") / "r"
    with pytest.MonkeyPatch.context() as mp:  # this test is about scores: the shortest latency protocol
        mp.setattr("gripbench.sweep.LATENCY_WARMUP", 1)
        mp.setattr("gripbench.sweep.LATENCY_REPEATS", 2)
        run_sweep(model="embedded", methods="none,fastv", tasks=",".join(names.values()), budgets=[1.0, 0.25], limit=N,
                  out=out, include_path=str(root), progress=False, batch_size=8)
    from gripbench.store import ResultsStore

    store = ResultsStore(out)
    return store.cells(), store.samples()


def test_every_task_cell_equals_lmms_eval_on_the_same_predictions(stock, swept, embedded, tmp_path, monkeypatch):
    """For each task and method: lmms-eval's own aggregate (an independent run) == the cell's
    metric_value; the cell's per-sample scores == the task's process_results on the same answers."""
    from lmms_eval.evaluator import simple_evaluate

    from gripbench.engine import Engine
    from gripbench.lmms import catalog
    from gripbench.lmms.metrics import headline, sample_score
    from gripbench.lmms.model import GripbenchLMM
    from gripbench.methods import create_method

    monkeypatch.chdir(tmp_path)  # textvqa and ocrbench write side files into the working directory
    root, names = stock
    cells, samples = swept
    assert len(cells) == 2 * len(STOCK) and set(cells["task"]) == set(names.values())
    lm = GripbenchLMM(engine=Engine(*embedded), batch_size=8)
    for method, m in ("none", create_method("none")), ("fastv", create_method("fastv", budget=0.25)):
        lm.set_method(m)
        for stock_name, local in names.items():
            cell = cells[(cells["task"] == local) & (cells["method"] == method)].iloc[0]
            task = catalog.load_task(local, str(root))
            out = simple_evaluate(model=lm, tasks=[local], limit=N, log_samples=True, batch_size=8,
                                  task_manager=catalog.task_manager([str(root)]))
            metric, filt = headline(out["configs"][local], local, out["samples"][local])
            assert cell["metric"] == f"{metric},{filt}"
            assert cell["metric_value"] == pytest.approx(out["results"][local][f"{metric},{filt}"]), (local, method)
            # the same answers, scored again by the task's own process_results
            own = sorted(sample_score(task.process_results(s["doc"], [s["filtered_resps"][0]])[metric], local, metric)
                         for s in out["samples"][local] if metric in s)
            got = samples[samples["config_hash"] == cell["config_hash"]]
            assert sorted(got["score"]) == pytest.approx(own)
            assert sorted(got["prediction"]) == sorted(str(s["filtered_resps"][0]) for s in out["samples"][local] if metric in s)
            assert cell["n_samples"] == len(own) == N
            if stock_name == "mme":  # pairs kept whole; accuracy = the MME score over 200 per category
                assert cell["accuracy_unit"] == "question pair" and got["unit"].value_counts().eq(2).all()
                assert cell["accuracy"] == pytest.approx(cell["metric_value"] / (200 * got["stratum"].nunique()))
            elif stock_name == "ocrbench":  # lmms-eval divides by 1000 whatever the limit; accuracy is the mean
                assert cell["accuracy"] == pytest.approx(cell["metric_value"] * 1000 / N)
            else:
                assert cell["accuracy"] == pytest.approx(cell["metric_value"])


def test_cells_are_timed_on_their_own_tasks_prompts(stock, swept):
    """Latency per task: every cell has its own timing, on its task's batch."""
    cells, _ = swept
    assert "latency_task" not in cells
    fastv = cells[cells["method"] == "fastv"]
    assert fastv["latency_e2e_ms"].gt(0).all() and fastv["latency_e2e_ms"].nunique() == len(fastv)


def test_runner_times_the_prompts_lmms_eval_built(stock, embedded):
    from gripbench.methods import create_method
    from gripbench.sweep import Runner

    root, names = stock
    runner = Runner("embedded", 8, tasks=[names["pope"], names["ai2d"]], include_path=str(root))
    for stock_name in ("pope", "ai2d"):
        runner.evaluate(names[stock_name], create_method("none"), 4, 0)
        prompts = [p for _, p in runner.lm.inputs[names[stock_name]]]
        assert len(prompts) == 4
        tail = {"pope": "Answer the question using a single word or phrase.",
                "ai2d": "Answer with the option's letter from the given choices directly."}[stock_name]
        assert all(p.endswith(tail) for p in prompts)


def test_task_names_groups_and_include_paths(stock, tmp_path):
    from gripbench.sweep import plan, resolve_tasks

    root, names = stock
    paths = resolve_tasks("counting," + names["pope"], str(root))
    assert list(paths) == ["gripbench_counting", names["pope"]] and paths["gripbench_counting"] is None
    assert paths[names["pope"]].endswith(".yaml")
    with pytest.raises(GripbenchError, match="did you mean 'local_pope'"):
        resolve_tasks("local_pop", str(root))
    with pytest.raises(GripbenchError, match="no such folder"):
        resolve_tasks("local_pope", str(tmp_path / "nowhere"))
    # a judge-scored task is refused up front unless opted in
    with pytest.raises(GripbenchError, match="external LLM judge.*--allow-judge"):
        resolve_tasks("mmbench_en_dev")
    assert "mmbench_en_dev" in resolve_tasks("mmbench_en_dev", allow_judge=True)
    # a group expands into its tasks
    assert len(resolve_tasks("pope_full")) > 1
    # MME: an odd limit is rounded up so the last question pair stays whole
    cells = plan("embedded", "none", resolve_tasks(names["mme"] + "," + names["pope"], str(root)), "1", 7, 0)
    assert {c.task: c.limit for c in cells} == {names["mme"]: 8, names["pope"]: 7}


def test_a_copy_named_like_a_stock_task_is_refused(stock, tmp_path):
    """lmms-eval would silently run the stock task instead of the user's copy."""
    from gripbench.sweep import resolve_tasks

    root, names = stock
    own = tmp_path / "own"
    own.mkdir()
    src = root / names["pope"]
    for f in src.iterdir():
        text = f.read_text(errors="replace") if f.suffix in (".yaml", ".py") else None
        if text is not None:
            (own / f.name).write_text(text.replace(f"task: {names['pope']}", "task: pope"))
    with pytest.raises(GripbenchError, match="has the name of lmms-eval's stock task"):
        resolve_tasks("pope", str(own))


def test_unreadable_metric_is_one_line(tmp_path):
    from gripbench.lmms.metrics import read_cell

    logged = [{"doc_id": i, "weird": "high"} for i in range(3)]
    config = {"metric_list": [{"metric": "weird"}]}
    with pytest.raises(GripbenchError, match="cannot read a per-sample score from metric 'weird'"):
        read_cell("mytask", config, {"weird,none": 1.0}, logged)
    logged = [{"doc_id": i, "m": 0.5} for i in range(3)]
    with pytest.raises(GripbenchError, match="not the mean of its per-sample scores"):
        read_cell("mytask", {"metric_list": [{"metric": "m"}]}, {"m,none": 0.9}, logged)
    assert read_cell("t", {"metric_list": [{"metric": "m"}]}, {"m,none": 50.0}, logged).accuracy == 0.5  # percent


def test_missing_data_offline_is_one_line(monkeypatch):
    from gripbench.sweep import check_data

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GripbenchError, match="lmms-lab-encoder/POPE.*not available offline"):
        check_data(["pope"])


def test_old_results_read_as_scores():
    """Schema 2 samples held a boolean `correct`: read back as a 0/1 score, one sample one unit."""
    from gripbench import schema

    old = pd.DataFrame({"config_hash": ["h", "h"], "sample_id": ["a", "b"], "correct": [True, False]})
    new = schema.upgrade(old, schema.SAMPLE)
    assert list(new["score"]) == [1.0, 0.0] and list(new["unit"]) == ["a", "b"]
    schema.validate(new, schema.SAMPLE, "old")
