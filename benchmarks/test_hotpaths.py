"""pytest-benchmark benchmarks of the hot paths: engine prefill at several budgets, each
registered method's selection step, the GRIP scorer's forward.

Not part of the test run (pytest's testpaths is tests/). Run and compare:

    python -m pytest benchmarks/test_hotpaths.py --benchmark-storage=file://benchmarks/baseline \
        --benchmark-compare=0001 --benchmark-compare-fail=median:40%

against the committed baseline (benchmarks/baseline/, measured on a shared 2-core CPU,
where unchanged code drifted by up to 37% on the sub-15 ms medians: hence 40%; see the
README). Absolute times depend on the machine; compare runs made on the same kind.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from gripbench.engine import Engine
from gripbench.methods import create_method, registry
from gripbench.tasks.suite import TASKS, make_sample
from gripbench.zoo import load

torch.set_num_threads(2)
BATCH = 8


@pytest.fixture(scope="module")
def setup():
    engine = Engine(*load("embedded", device="cpu"))
    samples = [make_sample(t, "val", i) for i in range(2) for t in TASKS][:BATCH]
    batch = engine.prepare([s.image for s in samples], [s.question for s in samples])
    with torch.no_grad():
        vision = engine.vision(batch)
    return engine, batch, vision


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25, 0.0625])
def test_prefill(benchmark, setup, budget):
    """LLM prefill of a batch of 8 with `random` pre-LLM pruning (budget 1 = unpruned)."""
    engine, batch, vision = setup
    method = create_method("random", budget=budget)
    benchmark.group = "prefill (batch 8)"
    with torch.no_grad():
        benchmark(engine.prefill, batch, method, vision)


class _Capture:
    """Wraps a method and keeps the context of its first pruning point, to time select() alone."""

    def __init__(self, method):
        self.method, self.seen = method, None
        self.seed = method.seed

    def plan(self, info):
        return self.method.plan(info)[:1]

    def select(self, ctx, point):
        self.seen = (ctx, point)
        return self.method.select(ctx, point)


def _methods() -> list[str]:
    names = [m for m in registry().names() if m != "none"]
    return names


@pytest.mark.parametrize("name", _methods())
def test_selection(benchmark, setup, name):
    """One method's selection at rho = 0.25 on a fresh context (signals recomputed each round)."""
    engine, batch, vision = setup
    method = create_method(name, budget=0.25)

    def fresh():
        cap = _Capture(method)
        with torch.no_grad():
            engine.prefill(batch, cap, vision)
        return cap.seen, {}

    benchmark.group = "selection at rho=0.25 (batch 8)"
    with torch.no_grad():
        benchmark.pedantic(method.select, setup=fresh, rounds=10, iterations=1)


def test_grip_scorer(benchmark, setup):
    """Forward of the budget-aware scorer alone (batch 8, 144 visual tokens)."""
    from gripbench.grip.scorer import BudgetAwareScorer

    engine, batch, vision = setup
    ctx = engine.context(batch, vision)
    feats, (q, qm) = ctx.visual_features(), ctx.question_embeddings()
    scorer = BudgetAwareScorer(feats.shape[-1]).eval()
    rho = torch.full((feats.shape[0],), 0.25)
    benchmark.group = "scorer"
    with torch.no_grad():
        benchmark(scorer, feats, q, qm, rho, engine.info.grid)


@pytest.fixture(scope="module")
def runner():
    from gripbench.sweep import Runner

    return Runner("embedded", batch_size=32, tasks=["gripbench_counting"])


@pytest.mark.parametrize("name", ["none", "fastv", "grip"])
def test_cell(benchmark, runner, name):
    """A whole sweep cell as `gripbench sweep` runs it (lmms-eval's evaluation of 32 counting
    questions, FLOPs, bootstrap interval, the latency protocol): what a sweep pays per cell."""
    from gripbench.sweep import Cell, with_identity

    params = json.dumps(create_method(name, budget=0.25).describe_params(), sort_keys=True)
    cell = with_identity([Cell("embedded", "gripbench_counting", name, 1.0 if name == "none" else 0.25, 32, 0, params)],
                         {"gripbench_counting": None})[0]
    benchmark.group = "whole cell (32 questions)"
    benchmark.pedantic(runner.run, args=(cell,), rounds=3, iterations=1, warmup_rounds=1)
