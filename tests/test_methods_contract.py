"""The contract every registered pruning method keeps, on the embedded model and on a tiny
random llava-hf-style checkpoint. A new method registered through the entry point is tested
here with no new test code.

Golden snapshots of kept indices live in tests/golden/; regenerate with
`pytest tests/test_methods_contract.py --update-golden` after an intended change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gripbench.engine import Engine
from gripbench.methods import keep_count, registry

METHODS = registry().names()
SCORER_METHODS = {"grip", "grip-warmup", "dynamicvit"}  # trained weights ship for the embedded model only
GOLDEN = Path(__file__).parent / "golden" / "kept_indices.json"


@pytest.fixture(scope="module", params=["embedded", "tiny_hf"])
def engine(request):
    return Engine(*request.getfixturevalue(request.param))


@pytest.fixture(scope="module")
def random_scorers(tmp_path_factory):
    """Untrained scorers per hidden size, for models without shipped scorer weights (the
    shipped GRIP / DynamicViT scorers are trained for the embedded model only)."""
    from gripbench.grip.method import save_scorer
    from gripbench.grip.scorer import BudgetAwareScorer

    folder, made = tmp_path_factory.mktemp("scorers"), {}

    def get(dim: int) -> str:
        if dim not in made:
            torch.manual_seed(0)
            made[dim] = str(folder / f"scorer{dim}.safetensors")
            save_scorer(BudgetAwareScorer(dim), made[dim])
        return made[dim]
    return get


def make(engine, name, random_scorers=None, **kw):
    """registry().create, with an untrained scorer for scorer methods on other models."""
    if name in SCORER_METHODS and engine.info.hidden_size != 192:
        kw["scorer"] = random_scorers(engine.info.hidden_size)
    return registry().create(name, **kw)


@pytest.fixture(scope="module")
def batch(engine, samples):
    return engine.prepare([s.image for s in samples[:4]], [s.question for s in samples[:4]])


def _rows(batch, i):
    """Row i alone, without its left padding."""
    keep = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i:i + 1, keep], "attention_mask": batch["attention_mask"][i:i + 1, keep],
            "pixel_values": batch["pixel_values"][i:i + 1]}


def expected_per_layer(method, info) -> list[int]:
    """Visual tokens each LLM layer should see, from the method's own plan."""
    counts, current = [], info.num_visual_tokens
    points = {p.layer: p.keep for p in method.plan(info)}
    for layer in range(info.num_layers):
        current = points.get(layer, current)
        counts.append(current)
    return counts


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.0625])
@pytest.mark.parametrize("name", METHODS)
def test_budget_is_honoured(engine, batch, name, budget, random_scorers):
    method = make(engine, name, random_scorers, budget=budget)
    gen = engine.generate(batch, method, max_new_tokens=2)
    info = engine.info
    assert gen.visual_per_layer == expected_per_layer(method, info)
    assert all(len(k) == gen.visual_per_layer[-1] for k in gen.kept_indices)
    assert all(k == sorted(set(k)) and 0 <= k[0] and k[-1] < info.num_visual_tokens for k in gen.kept_indices)
    n, avg = info.num_visual_tokens, gen.tokens_layer_avg[0]
    points = method.plan(info)
    if name == "none":
        assert avg == n
    elif points and points[0].layer == 0 and name != "pool":  # pre-LLM methods keep round(rho*N)
        assert gen.tokens_llm_input[0] == keep_count(budget, n)
    elif name in ("fastv", "sparsevlm"):  # layer average matches rho where the method can reach it
        first = points[0].layer if points else info.num_layers
        reachable = budget * n >= first * n / info.num_layers + n / info.num_layers
        if reachable:
            assert abs(avg - budget * n) <= 0.5 * n / info.num_layers + 1
        else:
            assert avg >= budget * n


@pytest.mark.parametrize("name", METHODS)
def test_deterministic(engine, batch, name, random_scorers):
    a = engine.generate(batch, make(engine, name, random_scorers, budget=0.25, seed=3), max_new_tokens=3)
    b = engine.generate(batch, make(engine, name, random_scorers, budget=0.25, seed=3), max_new_tokens=3)
    assert a.kept_indices == b.kept_indices
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_is_the_unpruned_model(engine, batch, name, random_scorers):
    ref, mask = engine.logits(batch, None)
    out, mask2 = engine.logits(batch, make(engine, name, random_scorers, budget=1.0))
    assert out.shape == ref.shape
    assert (out - ref)[mask].abs().max() < 1e-4


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_one_by_one(engine, batch, name, random_scorers):
    method = make(engine, name, random_scorers, budget=0.25, seed=1)
    together = engine.generate(batch, method, max_new_tokens=3)
    for i in range(batch["input_ids"].shape[0]):
        alone = engine.generate(_rows(batch, i), method, max_new_tokens=3)
        assert alone.kept_indices[0] == together.kept_indices[i]
        pad = engine.pad_id  # a batch pads rows that stopped early at EOS
        assert [t for t in alone.tokens[0].tolist() if t != pad] == [t for t in together.tokens[i].tolist() if t != pad]


def test_golden_kept_indices(embedded, samples, update_golden):
    engine = Engine(*embedded)
    batch = engine.prepare([s.image for s in samples[:4]], [s.question for s in samples[:4]])
    got = {name: engine.generate(batch, registry().create(name, budget=0.125, seed=0), max_new_tokens=1).kept_indices
           for name in METHODS}
    if update_golden:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1))
        pytest.skip("golden snapshots rewritten")
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; create it with --update-golden")
    want = json.loads(GOLDEN.read_text())
    assert set(want) == set(METHODS), "a method was added or removed: regenerate with --update-golden"
    for name in METHODS:
        assert got[name] == want[name], f"{name} keeps different tokens than its golden snapshot"
