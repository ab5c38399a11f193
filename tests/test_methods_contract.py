"""The contract every registered pruning method keeps, on the embedded model and on a tiny
random llava-hf-style checkpoint. A new method registered through the entry point is tested
here with no new test code; the checks themselves live in `gripbench.testing`, the same
functions `python3 -m gripbench.testing NAME` runs for a plugin author.

Golden snapshots of kept indices live in tests/golden/<method>.json; regenerate with
`pytest tests/test_methods_contract.py --update-golden` after an intended change. A method
without a snapshot (a plugin installed beside gripbench) is skipped, not failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gripbench import testing
from gripbench.engine import Engine
from gripbench.methods import registry

METHODS = registry().names()
SCORER_METHODS = {"grip", "grip-warmup", "dynamicvit"}  # trained weights ship for the embedded model only
GOLDEN = Path(__file__).parent / "golden"


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


def factory(engine, name, random_scorers):
    """testing.method_factory, with an untrained scorer for scorer methods on other models."""
    if name in SCORER_METHODS and engine.info.hidden_size != 192:
        return testing.method_factory(name, scorer=random_scorers(engine.info.hidden_size))
    return testing.method_factory(name)


@pytest.fixture(scope="module")
def batch(engine, samples):
    return testing.contract_batch(engine, samples)


@pytest.mark.parametrize("budget", testing.BUDGETS)
@pytest.mark.parametrize("name", METHODS)
def test_budget_is_honoured(engine, batch, name, budget, random_scorers):
    assert not testing.check_accounting(engine, factory(engine, name, random_scorers), batch, budgets=[budget])


@pytest.mark.parametrize("name", METHODS)
def test_unreachable_budget_records_the_minimum(engine, batch, name, random_scorers):
    """At a budget below every method's reach, an in-LLM method says so and records its minimum
    (checked inside check_accounting); a pre-LLM method still keeps keep_count = 1 token."""
    assert not testing.check_accounting(engine, factory(engine, name, random_scorers), batch, budgets=[0.01])


@pytest.mark.parametrize("name", METHODS)
def test_deterministic(engine, batch, name, random_scorers):
    assert not testing.check_deterministic(engine, factory(engine, name, random_scorers), batch)


@pytest.mark.parametrize("name", METHODS)
def test_full_budget_is_the_unpruned_model(engine, batch, name, random_scorers):
    assert not testing.check_full_budget(engine, factory(engine, name, random_scorers), batch)


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_one_by_one(engine, batch, name, random_scorers):
    assert not testing.check_batch_equals_rows(engine, factory(engine, name, random_scorers), batch)


@pytest.mark.parametrize("name", METHODS)
def test_plan_is_pure(engine, batch, name, random_scorers):
    assert not testing.check_plan_pure(engine, factory(engine, name, random_scorers), batch)


@pytest.mark.parametrize("name", METHODS)
def test_registry_and_parameters(name):
    assert not testing.check_params(name)


@pytest.fixture(scope="module")
def golden_run(embedded, samples):
    engine = Engine(*embedded)
    return engine, testing.contract_batch(engine, samples)


@pytest.mark.parametrize("name", METHODS)
def test_golden_kept_indices(golden_run, name, update_golden):
    engine, batch = golden_run
    path = GOLDEN / f"{name}.json"
    got = engine.generate(batch, registry().create(name, budget=0.125, seed=0), max_new_tokens=1).kept_indices
    if update_golden:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1))
        pytest.skip(f"golden snapshot of {name} rewritten")
    if not path.exists():
        pytest.skip(f"no golden snapshot for method {name}: run pytest --update-golden to create one")
    assert got == json.loads(path.read_text()), f"{name} keeps different tokens than its golden snapshot"


def test_typed_parameters_are_checked_and_converted():
    from gripbench.errors import GripbenchError
    from gripbench.methods import create_method

    fastv = create_method("fastv", budget="0.25", K="2", R="0.5", variant="all")  # strings, as the CLI passes them
    assert fastv.describe_params() == {"K": 2, "R": 0.5, "variant": "all"} and fastv.budget == 0.25
    assert create_method("fastv", K=3).params == {"K": 3, "R": None, "variant": "last"}  # the old attribute still reads
    assert create_method("fastv", K="none").K is None
    assert create_method("sparsevlm", recycle="no").recycle is False
    assert create_method("grip", scorer=Path("/x.safetensors")).scorer == "/x.safetensors"
    cases = {
        "unknown parameter 'varient' for method 'fastv' (did you mean 'variant'?) (parameters: K: int | None, R: float | None, "
        "variant: 'last'|'all')": dict(varient="all"),
        "parameter K of fastv must be an int or none, not 'two'": dict(K="two"),
        "parameter variant of fastv must be one of 'last'|'all', not 'ALL'": dict(variant="ALL"),
        "parameter R of fastv must be in [0, 1), not 1": dict(R="1"),
        "parameter K of fastv must be at least 1 (layer 0 is before the LLM), not 0": dict(K=0),
    }
    for message, params in cases.items():
        with pytest.raises(GripbenchError) as e:
            create_method("fastv", **params)
        assert str(e.value) == message
    with pytest.raises(GripbenchError, match="parameter recycle of sparsevlm must be a boolean"):
        create_method("sparsevlm", recycle="maybe")
    with pytest.raises(GripbenchError, match=r"unknown parameter 'k' for method 'random' \(parameters: none besides budget"):
        create_method("random", k=3)
    from gripbench.methods import ModelInfo

    with pytest.raises(GripbenchError, match="parameter K=8 of fastv must be below the model's 8 LLM layers"):
        create_method("fastv", K=8).plan(ModelInfo(144, 8, 192, (12, 12)))


def test_fastv_official_k_and_sparsevlm_official_layers():
    """FastV prunes before layer K = 2 (the official default, not scaled with depth: the
    embedded 8-layer model got K = 1 before); SparseVLM scores with layers 2 / 6 / 15 of 32
    and prunes their outputs, so the pruned counts are first seen by layers 3 / 7 / 16."""
    from baselines.sparsevlm import scaled_layers
    from gripbench.methods import ModelInfo, create_method

    assert create_method("fastv", budget=0.5).plan(ModelInfo(144, 8, 192, (12, 12)))[0].layer == 2
    assert create_method("fastv", budget=0.5).plan(ModelInfo(576, 32, 4096, (24, 24)))[0].layer == 2
    assert create_method("fastv", budget=0.9).plan(ModelInfo(16, 2, 64, (4, 4)))[0].layer == 1
    assert scaled_layers(32) == [3, 7, 16]
    assert [p.layer for p in create_method("sparsevlm", budget=0.33).plan(ModelInfo(576, 32, 4096, (24, 24)))] == [3, 7, 16]


def test_parse_method_args():
    from gripbench.errors import GripbenchError
    from gripbench.methods import parse_method_args

    assert parse_method_args("fastv:K=2,R=0.5") == {"fastv": {"K": "2", "R": "0.5"}}
    assert parse_method_args(" fastv:K=2 ; grip:scorer=/x.safetensors ") == {"fastv": {"K": "2"}, "grip": {"scorer": "/x.safetensors"}}
    assert parse_method_args("") == {}
    for bad in ("fastv", "fastv:", "fastv:K", ":K=2", "fastv:K=1,K=2", "fastv:K=1;fastv:R=0.5", "fastv:2K=1"):
        with pytest.raises(GripbenchError) as e:
            parse_method_args(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(GripbenchError, match=r"e\.g\. 'fastv:K=2,R=0\.5;grip:scorer=/x\.safetensors'"):
        parse_method_args("fastv")


def test_one_rounding_rule():
    """Token counts round half up everywhere (Python's round() rounds 2.5 to 2)."""
    from baselines.fastv import default_layer
    from baselines.sparsevlm import scaled_layers
    from gripbench.methods import grid_side, grid_tokens, keep_count, round_half_up

    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999)] == [1, 2, 3, 2]
    assert keep_count(0.125, 20) == 3 and keep_count(0.5, 5) == 3  # 2.5 -> 3
    assert default_layer(40) == 2 and default_layer(2) == 1  # the official K = 2, below the depth
    assert scaled_layers(16) == [2, 4, 9]  # scoring 2 * 16 / 32 = 1, 6 * 16 / 32 = 3, 15 * 16 / 32 = 7.5 -> 8; then + 1
    assert scaled_layers(8) == [2, 3, 5]  # scoring 0.5 -> 1, 1.5 -> 2, 3.75 -> 4; then + 1
    assert grid_side(0.0625, 10) == 3  # 10 * sqrt(0.0625) = 2.5 -> 3
    assert grid_tokens(0.0625, [(10, 10), (4, 6)]) == 3 * 3 + 1 * 2  # 4 * 0.25 = 1, 6 * 0.25 = 1.5 -> 2


def test_parameter_declaration_styles():
    """Typed fields work without @dataclass; with it too, including field(...) state; a
    field(...) without the decorator, or an unknown accounting, is refused at once."""
    from dataclasses import dataclass, field

    from gripbench.errors import GripbenchError
    from gripbench.methods import PruningMethod, param_specs

    class Plain(PruningMethod):
        k: int = 2

    @dataclass
    class Decorated(PruningMethod):
        k: int = 2
        _cache: dict = field(default_factory=dict, init=False)

    assert Plain(k="3").describe_params() == {"k": 3} and Plain().k == 2
    assert Decorated(k="4").describe_params() == {"k": 4} and Decorated()._cache == {}

    class Undecorated(PruningMethod):
        k: int = field(default=2)

    with pytest.raises(GripbenchError, match="decorate it with @dataclass"):
        param_specs(Undecorated)
    with pytest.raises(TypeError, match="accounting = 'tokens'"):
        type("BadAccounting", (PruningMethod,), {"accounting": "tokens"})
