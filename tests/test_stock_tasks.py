"""Local copies of eight stock lmms-eval tasks (`gripbench.testing.stock_tasks`) scored by the
stock `process_results`/aggregation code, with `ScriptedLM` replies of known correctness.

Every expected score is computed here by hand from the written parquet rows (and, for n = 8,
also pinned as a literal), independently of the stock code. Evaluations run in a scratch
working directory: textvqa's and ocrbench's aggregations write `submissions/` and `results/`
into the working directory. HF_HUB_OFFLINE / HF_DATASETS_OFFLINE come from conftest.py.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from gripbench.analysis import bootstrap_ci  # noqa: E402
from gripbench.lmms.metrics import read_cell  # noqa: E402
from gripbench.testing.scripted import ScriptedLM, all_right, all_wrong, right_half  # noqa: E402
from gripbench.testing.stock_tasks import STOCK, _load_yaml, stock_tasks_dir, write_stock_tasks  # noqa: E402

# the stock ai2d utils.py has an invalid escape in a docstring; lmms-eval re-executes it on each load
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")

N = 8
HEADLINE = {  # stock task -> result key of its first metric
    "pope": "pope_accuracy,none",
    "mme": "mme_perception_score,none",
    "textvqa_val": "exact_match,none",
    "gqa": "exact_match,none",
    "chartqa": "relaxed_overall,none",
    "ocrbench": "ocrbench_accuracy,none",
    "scienceqa_img": "exact_match,none",
    "ai2d": "exact_match,flexible-extract",
}
# right_half on the n = 8 copies, worked out by hand (see `expected_headline` for the formulas):
# mme: 4 pairs, 2 categories x (a right pair 100 + 100, a wrong pair 0 + 0) / 2 = 100 each;
# textvqa: even docs 0, 2, 4, 6 have answers[0] 10, 2, 3, 10 times -> (1 + 0.6 + 0.9 + 1) / 8;
# ocrbench: 4 right / 1000.
RIGHT_HALF_N8 = {"pope": 0.5, "mme": 200.0, "textvqa_val": 0.4375, "gqa": 0.5, "chartqa": 0.5, "ocrbench": 0.004,
                 "scienceqa_img": 0.5, "ai2d": 0.5}


@pytest.fixture(scope="module")
def stock_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("stock_tasks")
    return base, write_stock_tasks(base / "tasks", n=N)


@pytest.fixture(scope="module")
def evaluate(stock_root):
    """evaluate(stock, answer) -> (simple_evaluate output, the ScriptedLM), one fresh load each."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    base, names = stock_root
    mp = pytest.MonkeyPatch()
    mp.chdir(base)  # submission files land here, not in the repository
    mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(base / "hf_datasets"))  # not ~/.cache/huggingface

    def run(stock, answer):
        lm = ScriptedLM(answer)
        tm = TaskManager(include_path=str(base / "tasks"), include_defaults=False)
        out = simple_evaluate(model=lm, tasks=[names[stock]], task_manager=tm, log_samples=True, batch_size=8, limit=None)
        return out, lm

    yield run
    mp.undo()


def rows(stock_root, stock) -> list[dict]:
    import pyarrow.parquet as pq

    base, names = stock_root
    return pq.read_table(base / "tasks" / names[stock] / f"{stock}.parquet").to_pylist()


def is_right(stock: str, doc_id: int) -> bool:
    return (doc_id // 2 if stock == "mme" else doc_id) % 2 == 0


def vqa_soft(answer: str, answers: list[str]) -> float:
    """VQA accuracy: for each of the ten annotators, min(1, matches among the other nine / 3), averaged."""
    return sum(min(1.0, sum(a == answer for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))) / len(answers)


def sample_score(stock: str, doc: dict, right: bool) -> float:
    """The per-sample score a right / wrong reply must get."""
    if not right:
        return 0.0
    return vqa_soft(doc["answers"][0], doc["answers"]) if stock == "textvqa_val" else 1.0


def expected_headline(stock: str, docs: list[dict], right) -> float:
    scores = [sample_score(stock, d, right(i)) for i, d in enumerate(docs)]
    if stock == "ocrbench":  # sum of 0/1 scores over the full benchmark's 1000 questions
        return sum(scores) / 1000
    if stock == "mme":  # per category: mean over image pairs of acc (0..100) + acc+ (100 iff both right); summed
        pairs = defaultdict(lambda: defaultdict(list))
        for d, s in zip(docs, scores):
            pairs[d["category"]][d["question_id"]].append(s)
        return sum(sum(50 * sum(p) + 100 * (sum(p) == 2) for p in qs.values()) / len(qs) for qs in pairs.values())
    return sum(scores) / len(scores)


def per_sample_values(stock: str, out: dict, local: str) -> list[float]:
    metric = HEADLINE[stock].split(",")[0]
    values = []
    for s in sorted(out["samples"][local], key=lambda s: s["doc_id"]):
        v = s[metric]
        values.append(float(v["score"]) if isinstance(v, dict) else float(v))
    return values


@pytest.mark.parametrize("stock", STOCK)
def test_right_half_gives_the_hand_computed_score(stock, stock_root, evaluate):
    _, names = stock_root
    local = names[stock]
    docs = rows(stock_root, stock)
    out, lm = evaluate(stock, right_half)
    got = out["results"][local][HEADLINE[stock]]
    want = expected_headline(stock, docs, lambda i: is_right(stock, i))
    assert want == pytest.approx(RIGHT_HALF_N8[stock])
    assert got == pytest.approx(want), f"{stock}: {got} != {want}"
    assert 0 < got < (200 * len({d["category"] for d in docs}) if stock == "mme" else 1)  # non-trivial
    # per-sample values, in the shapes the module docstring's table lists
    assert per_sample_values(stock, out, local) == pytest.approx([sample_score(stock, d, is_right(stock, i)) for i, d in enumerate(docs)])
    # the model saw every doc once, with its image and the stock prompt
    assert sorted(c["doc_id"] for c in lm.calls) == list(range(len(docs)))
    assert all(c["n_visuals"] == 1 for c in lm.calls)
    assert all(docs[c["doc_id"]]["question"].strip().lower()[:20] in c["context"].lower() for c in lm.calls)
    if stock == "chartqa":  # the per-type splits follow the `type` column
        for split, kind in (("relaxed_human_split,none", "human_test"), ("relaxed_augmented_split,none", "augmented_test")):
            ids = [i for i, d in enumerate(docs) if d["type"] == kind]
            assert out["results"][local][split] == pytest.approx(sum(is_right(stock, i) for i in ids) / len(ids))
    if stock == "pope":
        assert out["results"][local]["pope_yes_ratio,none"] == 0.5
    # gripbench's metric reader (what a sweep cell records) on the same output
    cell = read_cell(local, out["configs"][local], out["results"][local], out["samples"][local])
    assert cell.metric == HEADLINE[stock] and cell.metric_value == pytest.approx(got)
    assert cell.score_mean == pytest.approx(sum(per_sample_values(stock, out, local)) / len(docs))
    n_cat = len({d["category"] for d in docs}) if stock == "mme" else 1
    on_unit = {"mme": got / (200 * n_cat), "ocrbench": got * 1000 / len(docs)}.get(stock, got)
    assert cell.accuracy == pytest.approx(on_unit) and 0 < cell.accuracy < 1
    assert cell.unit == ("question pair" if stock == "mme" else "sample")
    lo, hi = bootstrap_ci(cell.samples)
    assert lo <= cell.accuracy <= hi


@pytest.mark.parametrize("stock", STOCK)
def test_correct_and_wrong_replies_score_one_and_zero_on_every_doc(stock, stock_root, evaluate):
    _, names = stock_root
    docs = rows(stock_root, stock)
    for answer, right in ((all_right, True), (all_wrong, False)):
        out, _ = evaluate(stock, answer)
        assert per_sample_values(stock, out, names[stock]) == pytest.approx([sample_score(stock, d, right) for d in docs])
        want = expected_headline(stock, docs, lambda i, r=right: r)
        assert out["results"][names[stock]][HEADLINE[stock]] == pytest.approx(want)


def test_ocrbench_adds_up_when_a_loaded_task_is_evaluated_again(stock_root, evaluate):
    """The trap: `OCRBench_score` in the stock utils is module state, never reset. By name, each
    evaluation re-executes utils.py (fresh dict); a reused Task object accumulates."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager, get_task_dict

    from gripbench.testing.stock_tasks import reset_ocrbench_score

    base, names = stock_root
    assert evaluate("ocrbench", right_half)[0]["results"][names["ocrbench"]]["ocrbench_accuracy,none"] == pytest.approx(0.004)
    assert evaluate("ocrbench", right_half)[0]["results"][names["ocrbench"]]["ocrbench_accuracy,none"] == pytest.approx(0.004)
    tm = TaskManager(include_path=str(base / "tasks"), include_defaults=False)  # without one, lmms-eval indexes ~2,000 stock tasks
    task = get_task_dict([names["ocrbench"]], tm)[names["ocrbench"]]
    got = []
    for _ in range(2):
        out = simple_evaluate(model=ScriptedLM(right_half), tasks=[task], task_manager=tm, log_samples=True, batch_size=8)
        got.append(out["results"][names["ocrbench"]]["ocrbench_accuracy,none"])
    assert got == pytest.approx([0.004, 0.008])
    assert reset_ocrbench_score(task)
    out = simple_evaluate(model=ScriptedLM(right_half), tasks=[task], task_manager=tm, log_samples=True, batch_size=8)
    assert out["results"][names["ocrbench"]]["ocrbench_accuracy,none"] == pytest.approx(0.004)


def test_scripted_lm_survives_a_second_evaluation(stock_root, evaluate):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    base, names = stock_root
    out, lm = evaluate("pope", right_half)
    out2 = simple_evaluate(model=lm, tasks=[names["pope"]], log_samples=True, batch_size=8,
                           task_manager=TaskManager(include_path=str(base / "tasks"), include_defaults=False))
    assert out2["results"][names["pope"]]["pope_accuracy,none"] == out["results"][names["pope"]]["pope_accuracy,none"]
    assert len(lm.calls) == 2 * N


def test_same_call_writes_the_same_bytes(stock_root, tmp_path):
    base, names = stock_root
    again = write_stock_tasks(tmp_path / "tasks", n=N)
    assert again == names == {t: f"local_{t}" for t in STOCK}
    for stock, local in names.items():
        a, b = base / "tasks" / local, tmp_path / "tasks" / local
        assert (a / f"{stock}.parquet").read_bytes() == (b / f"{stock}.parquet").read_bytes(), stock
        assert (a / "utils.py").read_bytes() == (b / "utils.py").read_bytes()
        yaml_a = (a / f"{local}.yaml").read_text().replace(str(base.resolve()), "ROOT")
        yaml_b = (b / f"{local}.yaml").read_text().replace(str(tmp_path.resolve()), "ROOT")
        assert yaml_a == yaml_b
    # rewriting in place changes nothing, and a longer copy starts with the same samples
    write_stock_tasks(tmp_path / "tasks", n=N, tasks=("pope",))
    assert (tmp_path / "tasks/local_pope/pope.parquet").read_bytes() == (base / "tasks/local_pope/pope.parquet").read_bytes()
    longer = write_stock_tasks(tmp_path / "longer", n=2 * N, tasks=("gqa",), prefix="big_")
    import pyarrow.parquet as pq

    assert longer == {"gqa": "big_gqa"}
    assert pq.read_table(tmp_path / "longer/big_gqa/gqa.parquet").to_pylist()[:N] == rows(stock_root, "gqa")
    assert not [p for p in (tmp_path / "tasks").rglob("*.tmp")]


KEPT = ("metric_list", "filter_list", "generation_kwargs", "lmms_eval_specific_kwargs", "process_results", "doc_to_visual",
        "doc_to_text", "doc_to_target", "output_type", "test_split", "validation_split", "model_specific_target_kwargs",
        "model_specific_generation_kwargs", "metadata")
SOURCES = {"pope": "pope/pope.yaml", "mme": "mme/mme.yaml", "textvqa_val": "textvqa/textvqa_val.yaml", "gqa": "gqa/gqa.yaml",
           "chartqa": "chartqa/chartqa.yaml", "ocrbench": "ocrbench/ocrbench.yaml",
           "scienceqa_img": "scienceqa/scienceqa_img.yaml", "ai2d": "ai2d/ai2d.yaml"}


@pytest.mark.parametrize("stock", STOCK)
def test_yaml_is_the_stock_one_pointed_at_local_parquet(stock, stock_root):
    base, names = stock_root
    local = names[stock]
    folder = base / "tasks" / local
    ours = _load_yaml(folder / f"{local}.yaml")
    theirs = _load_yaml(stock_tasks_dir() / SOURCES[stock])  # with textvqa's include merged in
    for key in KEPT:
        assert ours.get(key) == theirs.get(key), (stock, key)
    split = theirs.get("test_split") or theirs.get("validation_split")
    assert ours["task"] == local and ours["dataset_path"] == "parquet"
    assert ours["dataset_kwargs"] == {"data_files": {split: str((folder / f"{stock}.parquet").resolve())}}
    assert not {"include", "tag", "group", "dataset_name", "process_docs"} & set(ours)
    assert (folder / "utils.py").read_bytes() == (stock_tasks_dir() / SOURCES[stock]).parent.joinpath("utils.py").read_bytes()


def _stock_utils(stock):
    import importlib.util

    path = stock_tasks_dir() / SOURCES[stock].split("/")[0] / "utils.py"
    spec = importlib.util.spec_from_file_location(f"_stock_{stock}_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_schemas_hold_what_the_stock_code_reads(stock_root):
    from datasets import Image

    base, names = stock_root
    import datasets

    def features(stock):
        return datasets.Dataset.from_parquet(str(base / "tasks" / names[stock] / f"{stock}.parquet"),
                                             cache_dir=str(base / "hf_features")).features

    for stock in STOCK:
        assert isinstance(features(stock)["image"], Image), stock
    pope = rows(stock_root, "pope")
    assert sorted(d["answer"] for d in pope) == ["no"] * 4 + ["yes"] * 4 and all(isinstance(d["question_id"], str) for d in pope)
    mme = rows(stock_root, "mme")
    perception = _stock_utils("mme").eval_type_dict["Perception"]
    by_id = defaultdict(list)
    for i, d in enumerate(mme):
        by_id[d["question_id"]].append((i, d["answer"]))
        assert d["category"] in perception
    assert all(len(v) == 2 and v[1][0] == v[0][0] + 1 and {a for _, a in v} == {"Yes", "No"} for v in by_id.values())
    textvqa = rows(stock_root, "textvqa_val")
    assert all(len(d["answers"]) == 10 and isinstance(d["question_id"], int) and isinstance(d["image_id"], str) for d in textvqa)
    assert {str(features("textvqa_val")["question_id"].dtype)} == {"int32"}
    assert {"id", "imageId", "question", "answer", "fullAnswer"} <= set(rows(stock_root, "gqa")[0])
    chart = rows(stock_root, "chartqa")
    assert {d["type"] for d in chart} == {"human_test", "augmented_test"} and all(isinstance(d["answer"], str) for d in chart)
    ocr = rows(stock_root, "ocrbench")
    categories = _stock_utils("ocrbench").OCRBench_score
    assert all(d["question_type"] in categories and isinstance(d["answer"], list) for d in ocr)
    assert len({d["question_type"] for d in ocr}) == N
    sqa = rows(stock_root, "scienceqa_img")
    assert str(features("scienceqa_img")["answer"].dtype) == "int8"
    assert all(0 <= d["answer"] < len(d["choices"]) and isinstance(d["hint"], str) for d in sqa)
    assert len({len(d["choices"]) for d in sqa}) > 1
    ai2d = rows(stock_root, "ai2d")
    assert all(isinstance(d["answer"], str) and 0 <= int(d["answer"]) < len(d["options"]) for d in ai2d)
    # right answers are spread over the option letters
    assert len({d["answer"] for d in ai2d}) > 1 and len({d["answer"] for d in sqa}) > 1


def test_mme_keeps_pairs_whole_for_odd_n(tmp_path):
    import pyarrow.parquet as pq

    write_stock_tasks(tmp_path, n=3, tasks=("mme",))
    assert pq.read_metadata(tmp_path / "local_mme/mme.parquet").num_rows == 4
    with pytest.raises(KeyError):
        write_stock_tasks(tmp_path, tasks=("mmbench",))
    assert not Path(tmp_path / "local_mmbench").exists()
