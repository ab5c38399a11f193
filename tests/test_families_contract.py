"""Every registered method on every supported model family: the contract checks of
`gripbench.testing` (budget honoured by its accounting per row, deterministic, rho = 1 is
the unpruned model, a batch equals its rows one by one, plan is pure) on a tiny random
checkpoint of each family, with one batch whose rows carry images of different sizes and
aspect ratios (so, on dynamic-resolution families, different visual-token counts).

The families' own exactness tests (logits and greedy tokens against the stock model) live
in tests/test_family_*.py; the tiny checkpoints in gripbench/testing/families/.
"""

from __future__ import annotations

import pytest
import torch

from gripbench import testing
from gripbench.engine import Engine
from gripbench.methods import registry
from gripbench.testing.families import FAMILIES, build, family_images

METHODS = registry().names()
SCORER_METHODS = {"grip", "grip-warmup", "dynamicvit"}  # shipped scorers fit the embedded model only
QUESTIONS = ["what is the color of the circle?", "how many squares are there?", "is there a red triangle?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two (each op is too small to split), and far
    faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    from gripbench.grip.method import save_scorer
    from gripbench.grip.scorer import BudgetAwareScorer

    model, processor = build(request.param)
    engine = Engine(model, processor)
    images = family_images(request.param)[:3]
    batch = engine.prepare(images, QUESTIONS[:len(images)])
    torch.manual_seed(0)
    scorer = str(tmp_path_factory.mktemp("scorer") / "scorer.safetensors")
    save_scorer(BudgetAwareScorer(engine.adapter.hidden_size), scorer)  # untrained: the contract is about shapes and counts
    return request.param, engine, batch, scorer


def test_rows_differ_where_the_family_is_dynamic(family):
    """The batch really is ragged on families whose token count follows the image."""
    name, engine, batch, _ = family
    counts = [v.layout.size for v in engine.vision(batch)]
    assert len(counts) == batch["input_ids"].shape[0] and min(counts) > 0
    if any(tag in name for tag in ("qwen", "next", "onevision", "pixtral")):
        assert len(set(counts)) > 1, f"{name}: every row has {counts[0]} visual tokens"


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(family, name):
    fam, engine, batch, scorer = family
    params = {"scorer": scorer} if name in SCORER_METHODS else {}
    results = testing.run_checks(engine, testing.method_factory(name, **params), batch)
    testing.assert_contract(results)
