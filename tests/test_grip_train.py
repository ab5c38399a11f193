"""Scorer training runs end to end on a tiny random llava-hf-style checkpoint, on the embedded
suite and on real-data sources (a JSONL folder, a saved Hugging Face dataset, an lmms-eval
task), and every scorer file records what it was trained for."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from gripbench.engine import Engine
from gripbench.errors import GripbenchError
from gripbench.grip.data import load_data
from gripbench.grip.method import check_scorer_model, load_scorer, model_fingerprint, model_record, save_scorer, scorer_metadata
from gripbench.grip.scorer import BudgetAwareScorer
from gripbench.grip.train import ScorerTrainConfig, attention_importance, train_dynamicvit, train_grpo, train_warmup

QUIET = dict(log=lambda *_: None)
FEW = ScorerTrainConfig(batch=4, warmup_steps=2, grpo_steps=2, dynamicvit_steps=2, group=4, val_every=2,
                        val_per_task=1, val_samples=3)


def test_warmup_grpo_dynamicvit_few_steps(tiny_hf, tmp_path):
    engine = Engine(*tiny_hf)
    cfg = FEW
    warm = train_warmup(engine, cfg, tmp_path, **QUIET)
    grip = train_grpo(engine, cfg, tmp_path, warm, **QUIET)
    train_dynamicvit(engine, cfg, tmp_path, **QUIET)
    for name in ("grip-warmup", "grip", "dynamicvit"):
        scorer = load_scorer(str(tmp_path / f"{name}.safetensors"))
        assert scorer.dim == engine.info.hidden_size
        meta = scorer_metadata(tmp_path / f"{name}.safetensors")
        assert meta["data"]["spec"] == "embedded" and meta["method"] == name
    grpo = [json.loads(x) for x in (tmp_path / "grpo_log.jsonl").read_text().splitlines()]
    assert len(grpo) == 2 and {"reward", "kl", "entropy", "acc@0.25"} <= set(grpo[-1])
    assert all(r["kl"] >= 0 for r in grpo)
    # the warm-up trained: its weights left their initialisation
    torch.manual_seed(cfg.seed)
    fresh = BudgetAwareScorer(engine.info.hidden_size, cfg.width)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), warm.state_dict().values()))
    # a random model answers nothing right, so every episode of a group earns the same reward,
    # every advantage is zero and GRPO leaves the policy where it was
    if all(r["reward"] == grpo[0]["reward"] for r in grpo):
        assert all(torch.equal(a, b) for a, b in zip(warm.state_dict().values(), grip.state_dict().values()))


def test_attention_importance_is_a_distribution(tiny_hf, samples):
    engine = Engine(*tiny_hf)
    batch = engine.prepare([s.image for s in samples[:3]], [s.question for s in samples[:3]])
    target = attention_importance(engine, batch, engine.vision(batch))
    assert target.shape == (3, engine.info.num_visual_tokens)
    assert torch.allclose(target.sum(-1), torch.ones(3)) and (target >= 0).all()


def test_greedy_texts_reuse_the_teacher_forced_pass_exactly(tiny_hf, samples):
    from gripbench.grip.train import FixedKeep, greedy_texts

    engine = Engine(*tiny_hf)
    batch = engine.prepare([s.image for s in samples[:4]], [s.question for s in samples[:4]])
    vision = engine.vision(batch)
    g = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(engine.info.num_visual_tokens, generator=g)[:5].sort().values for _ in range(4)])
    gen = engine.generate(batch, FixedKeep(keep), max_new_tokens=4, vision=vision)
    targets = torch.randint(5, 50, (4, 4))
    targets[:2] = gen.tokens[:2]  # rows 0 and 1: exactly what greedy decoding emits
    targets[:2][targets[:2] == engine.pad_id] = -100
    with torch.no_grad():
        _, forced, _ = engine.score(batch, FixedKeep(keep), targets, vision)
    assert forced[:2].all()
    assert greedy_texts(engine, batch, keep, vision, targets, forced, 4) == gen.texts


# ---- real-data sources ---------------------------------------------------------------------------
def suite_rows(n: int) -> list:
    from gripbench.tasks.suite import TASKS, make_sample

    return [make_sample(list(TASKS)[i % len(TASKS)], "val", i) for i in range(n)]


def write_jsonl_folder(folder, n: int = 10):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    with open(folder / "data.jsonl", "w") as f:
        for i, s in enumerate(suite_rows(n)):
            s.image.save(folder / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "question": s.question, "answer": s.answer}) + "\n")
    return folder


def write_saved_dataset(folder, n: int = 10):
    """A DatasetDict (train + test) with its own column names, as `save_to_disk` writes it."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    rows = suite_rows(n)
    feats = Features({"img": Image(), "q": Value("string"), "a": Value("string")})
    ds = Dataset.from_dict({"img": [s.image for s in rows], "q": [s.question for s in rows],
                            "a": [s.answer for s in rows]}, features=feats)
    DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(folder))
    return folder


def test_train_on_a_jsonl_folder_records_provenance(tiny_hf, tmp_path):
    engine = Engine(*tiny_hf)
    data = load_data(str(write_jsonl_folder(tmp_path / "data")), seed=0, val_samples=3)
    assert len(data.validation()) == 2 and len(data.train_idx) == 8  # 20% of 10 held out
    assert not set(data.val_idx) & set(data.train_idx)
    again = load_data(str(tmp_path / "data"), seed=0, val_samples=3)
    assert again.val_idx == data.val_idx and [s.question for s in again.train_batch(0, 12)] == \
        [s.question for s in data.train_batch(0, 12)]  # same seed, same carve and order
    warm = train_warmup(engine, FEW, tmp_path / "out", data=data, **QUIET)
    train_grpo(engine, FEW, tmp_path / "out", warm, data=data, reference_meta=scorer_metadata(
        tmp_path / "out" / "grip-warmup.safetensors"), **QUIET)
    meta = scorer_metadata(tmp_path / "out" / "grip.safetensors")
    assert meta["model"]["fingerprint"] == model_fingerprint(engine.model)
    assert meta["model"]["hidden_size"] == engine.info.hidden_size and meta["model"]["identity"]
    assert meta["data"]["kind"] == "jsonl" and meta["data"]["identity"].startswith("sha256:")
    assert meta["data"]["n_train"] == 8 and meta["data"]["n_val"] == 2
    assert meta["training"]["steps"] == 2 and meta["training"]["seed"] == 0
    assert meta["training"]["reference"]["method"] == "grip-warmup"
    assert set(meta["validation"]) == {"acc@0.25", "acc@0.0625"} and meta["gripbench_version"]
    assert meta["config"]["grpo_steps"] == 2
    grpo = [json.loads(x) for x in (tmp_path / "out" / "grpo_log.jsonl").read_text().splitlines()]
    assert len(grpo) == 2 and 0 <= grpo[-1]["accuracy"] <= 1


def test_train_on_a_saved_dataset_with_mapped_columns(tiny_hf, tmp_path):
    engine = Engine(*tiny_hf)
    folder = write_saved_dataset(tmp_path / "ds")
    with pytest.raises(GripbenchError, match="no column 'image'"):
        load_data(str(folder))
    data = load_data(str(folder), columns="image=img,question=q,answer=a", val_samples=3)
    assert data.split == "train" and len(data.train_idx) + len(data.val_idx) == 10
    assert load_data(f"{folder}:test", columns="image=img,question=q,answer=a").split == "test"
    with pytest.raises(GripbenchError, match="did you mean 'test'"):
        load_data(f"{folder}:tset", columns="image=img,question=q,answer=a")
    train_warmup(engine, FEW, tmp_path / "out", data=data, **QUIET)
    train_dynamicvit(engine, FEW, tmp_path / "out", data=data, **QUIET)
    for name in ("grip-warmup", "dynamicvit"):
        meta = scorer_metadata(tmp_path / "out" / f"{name}.safetensors")
        assert meta["data"]["kind"] == "hf-disk" and meta["data"]["split"] == "train"
        assert meta["data"]["spec"] == str(folder)


@pytest.fixture(scope="module")
def stock_root(tmp_path_factory):
    """Local copies of three stock lmms-eval tasks (one include path: lmms-eval indexes once)."""
    stock = pytest.importorskip("gripbench.testing.stock_tasks")
    root = tmp_path_factory.mktemp("stock_tasks")
    names = stock.write_stock_tasks(root, n=8, tasks=("gqa", "ai2d", "textvqa_val"))
    return stock, str(root), names


def test_lmms_task_data_uses_the_task_prompt_filter_and_metric(stock_root):
    stock, root, names = stock_root
    for task in ("gqa", "ai2d", "textvqa_val"):
        data = load_data(f"lmms:{names[task]}", include_path=root, val_samples=2)
        s = data.validation()[0]
        assert data.score(s, stock.correct_answer(task, s.doc)) >= 0.6
        assert data.score(s, stock.wrong_answer(task, s.doc)) == 0.0
    from collections import Counter

    answers = data.docs[int(s.id)]["answers"]
    assert data.max_new_tokens <= 16 and s.answer == Counter(answers).most_common(1)[0][0]  # textvqa: the majority
    assert data.score(s, s.answer) == max(data.score(s, a) for a in set(answers))  # the best soft VQA score
    ai2d = load_data(f"lmms:{names['ai2d']}", include_path=root)
    s = ai2d.validation()[0]
    letter = stock.correct_answer("ai2d", s.doc)
    assert ai2d.filter_name == "flexible-extract" and "letter" in s.question
    assert ai2d.filtered(s.doc, f"{letter}. the diagram") == letter  # ai2d's own filter extracts the letter
    assert ai2d.score(s, f"{letter}. the diagram") == 1.0
    assert ai2d.describe()["split"] == "test" and ai2d.describe()["metric"] == "exact_match"


def test_train_few_steps_on_a_local_lmms_task(tiny_hf, tmp_path, stock_root):
    _, root, names = stock_root
    assert names["gqa"] == "local_gqa"
    engine = Engine(*tiny_hf)
    data = load_data("lmms:local_gqa", include_path=root, val_samples=2)
    cfg = ScorerTrainConfig(batch=2, warmup_steps=1, grpo_steps=1, group=2, val_every=1, val_samples=2,
                            val_budgets=(0.25,))
    warm = train_warmup(engine, cfg, tmp_path / "out", data=data, **QUIET)
    train_grpo(engine, cfg, tmp_path / "out", warm, data=data, **QUIET)
    meta = scorer_metadata(tmp_path / "out" / "grip.safetensors")
    assert meta["data"]["spec"] == "lmms:local_gqa" and meta["data"]["split"] == "testdev"
    assert meta["data"]["split_role"] == "test" and meta["data"]["metric"] == "exact_match"
    assert len(meta["data"]["identity"]) == 16 and "acc@0.25" in meta["validation"]


# ---- a scorer belongs to its model ---------------------------------------------------------------
def test_model_fingerprint_ignores_precision_and_catches_other_weights(tiny_hf):
    model = tiny_hf[0]
    print_ = model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).half()) == print_
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    assert model_fingerprint(other) != print_


def test_a_scorer_trained_for_another_model_is_refused(tiny_hf, embedded, tmp_path):
    from gripbench.evaluate import run_samples
    from gripbench.methods import create_method

    tiny, emb = Engine(*tiny_hf), Engine(*embedded)
    path = tmp_path / "grip.safetensors"
    save_scorer(BudgetAwareScorer(emb.info.hidden_size), path,
                {"method": "grip", "model": model_record(tiny.model, tiny.info.hidden_size)})
    check_scorer_model(path, tiny.model)  # its own model: fine
    with pytest.raises(GripbenchError, match=r"trained for model .* not embedded.*gripbench train grip --model embedded"):
        check_scorer_model(path, emb.model)
    method = create_method("grip", budget=0.25, scorer=str(path))
    with pytest.raises(GripbenchError, match="was trained for model"):
        run_samples(emb, suite_rows(2), method)
    # a scorer without a recorded model (the shipped ones) keeps working
    plain = tmp_path / "plain.safetensors"
    save_scorer(BudgetAwareScorer(emb.info.hidden_size), plain)
    assert len(run_samples(emb, suite_rows(2), create_method("grip", budget=0.25, scorer=str(plain)))) == 2


# ---- command line --------------------------------------------------------------------------------
def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gripbench.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_data_is_one_line():
    r = cli("train", "warmup", "--data", "bad", "--steps", "1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--data 'bad'" in r.stderr, r.stderr
    with pytest.raises(GripbenchError, match="no such file or folder"):
        load_data("hf:/no/such/dataset")
    with pytest.raises(GripbenchError, match="--columns"):
        load_data("embedded", columns="image=x")


def test_cli_eval_refuses_a_scorer_for_another_model(tmp_path):
    path = tmp_path / "grip.safetensors"
    save_scorer(BudgetAwareScorer(192), path, {"method": "grip", "model": {
        "name": "llava-hf/llava-1.5-7b-hf", "identity": "hub:0123", "fingerprint": "0" * 16, "hidden_size": 192}})
    r = cli("eval", "--method", "grip", "--method-args", f"grip:scorer={path}", "--budget", "0.25", "--limit", "1",
            "--tasks", "text")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "trained for model llava-hf/llava-1.5-7b-hf (sha hub:0123" in r.stderr and "--model embedded" in r.stderr


def test_cli_trains_on_a_jsonl_folder(tmp_path):
    folder = write_jsonl_folder(tmp_path / "data", n=6)
    r = cli("train", "warmup", "--data", str(folder), "--steps", "1", "--batch", "2", "--val-samples", "2",
            "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "training on jsonl data 'data'" in r.stdout
    meta = scorer_metadata(tmp_path / "out" / "grip-warmup.safetensors")
    assert meta["model"]["name"] == "embedded" and meta["data"]["spec"] == str(folder)
