"""The contract every pruning method keeps, as plain functions a plugin author can run.

`python3 -m gripbench.testing NAME` runs every check on the embedded model for an installed
method and prints one PASS/FAIL line per check (exit 1 on a failure, 2 on an unknown method).
gripbench's own tests (tests/test_methods_contract.py) call the same functions over every
registered method and two models, so a plugin is held to exactly what the baselines are.

Each check takes an `Engine`, a *factory* (any callable `factory(budget=..., seed=...)`
returning a method: a PruningMethod subclass, or `method_factory(name, **params)` for a
registered one) and a batch, and returns a list of failures (empty = passed), so it can be
used from pytest (`assert not failures`), a script, or `run_contract`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gripbench.errors import GripbenchError
from gripbench.methods import ACCOUNTINGS, ModelInfo, PruningMethod, grid_tokens, keep_count, layer_counts, param_specs, registry

Factory = Callable[..., PruningMethod]
BUDGETS = (0.5, 0.25, 0.125)
TINY_BUDGET = 1e-9  # below anything a method can reach: its plan at this budget is its minimum


def method_factory(name: str, **params) -> Factory:
    """`factory(budget=, seed=)` for a registered method with fixed extra parameters."""
    return lambda budget=1.0, seed=0: registry().create(name, budget=budget, seed=seed, **params)


def contract_samples(n: int = 4) -> list:
    """The fixed validation questions the checks run on (one per task, then the next)."""
    from gripbench.tasks.suite import TASKS, make_sample

    return [make_sample(t, "val", i) for i in range(2) for t in TASKS][:n]


def contract_batch(engine, samples=None, n: int = 4) -> dict:
    samples = contract_samples(n) if samples is None else samples[:n]
    return engine.prepare([s.image for s in samples], [s.question for s in samples])


def _row(engine, batch: dict, i: int) -> dict:
    """Row i alone, without its left padding."""
    return engine.adapter.row_batch(batch, i)


def _avg(counts: list[int]) -> float:
    return sum(counts) / len(counts)  # the engine's own formula, so equal plans compare exactly


def row_infos(engine, batch: dict) -> tuple[list, list[ModelInfo], list[int]]:
    """(vision outputs, the ModelInfo a method plans with, fixed-token count) per row: rows of
    dynamic-resolution families differ in visual-token count and grids."""
    vision = engine.vision(batch)
    infos = [engine.adapter.group_info(v.layout) for v in vision]
    return vision, infos, [v.layout.size - i.num_visual_tokens for v, i in zip(vision, infos)]


def check_accounting(engine, factory: Factory, batch: dict, budgets=BUDGETS) -> list[str]:
    """The recorded token counts honour the method's plan and its declared `accounting`, per
    row with the row's own visual-token count N (prunable tokens; a family's fixed tokens,
    e.g. image-newline tokens, are added to every count): `llm_input`: tokens entering layer
    0 = keep_count(rho, N); `layer_avg`: the layer average is rho*N within one token per
    pruning point, or, where `reachable` is False, the method's minimum (its count at a
    vanishing budget) and above rho*N; `grid`: grid_tokens(rho, grids) into layer 0; `none`:
    every token at every layer. Kept indices are sorted, unique, within 0..N-1 and as many
    as the last layer sees."""
    vision, infos, fixed = row_infos(engine, batch)
    out = []
    for budget in budgets:
        method = factory(budget=budget, seed=0)
        acc, tag = method.accounting, f"rho={budget:g}"
        if acc not in ACCOUNTINGS:
            out.append(f"{tag}: unknown accounting {acc!r} (expected one of {', '.join(ACCOUNTINGS)})")
            continue
        gen = engine.generate(batch, method, max_new_tokens=2, vision=vision)
        for i, (info, f) in enumerate(zip(infos, fixed)):
            rtag = f"{tag} row {i}"
            n, layers = info.num_visual_tokens, info.num_layers
            points = method.plan(info)
            counts = [c - f for c in gen.visual_per_layer[i]]
            if counts != layer_counts(points, info):
                out.append(f"{rtag}: visual tokens per layer {counts} differ from the plan's {layer_counts(points, info)}")
            kept = gen.kept_indices[i]
            if kept != sorted(set(kept)) or (kept and not 0 <= kept[0] <= kept[-1] < n) or len(kept) != counts[-1]:
                out.append(f"{rtag}: kept indices are not {counts[-1]} sorted unique indices in 0..{n - 1}")
            got_in, got_avg = counts[0], _avg(counts)
            asked = budget * n
            if acc == "none":
                if counts != [n] * layers:
                    out.append(f"{rtag}: accounting 'none' keeps all {n} tokens at every layer, got {counts}")
                continue
            if not method.reachable(info):
                floor = _avg(layer_counts(factory(budget=TINY_BUDGET, seed=0).plan(info), info))
                if not (abs(got_avg - floor) < 1e-9 and got_avg > asked):
                    out.append(f"{rtag}: unreachable, so the layer average should be the method's minimum {floor:g} "
                               f"(> {asked:g}), got {got_avg:g}")
            elif acc == "llm_input" and got_in != keep_count(budget, n):
                out.append(f"{rtag}: {got_in} visual tokens entered the LLM; accounting 'llm_input' needs keep_count = "
                           f"{keep_count(budget, n)}")
            elif acc == "layer_avg" and abs(got_avg - asked) > max(1, len(points)) + 1e-9:
                out.append(f"{rtag}: layer-averaged visual tokens {got_avg:g}; accounting 'layer_avg' needs {asked:g} "
                           f"within {max(1, len(points))} token(s), or reachable() False")
            elif acc == "grid":
                if not info.grids:
                    out.append(f"{rtag}: accounting 'grid' on a layout without visual-token grids")
                elif got_in != grid_tokens(budget, info.grids):
                    out.append(f"{rtag}: {got_in} visual tokens entered the LLM; accounting 'grid' needs "
                               f"grid_tokens = {grid_tokens(budget, info.grids)} for grids {list(info.grids)}")
    return out


def check_deterministic(engine, factory: Factory, batch: dict, budget: float = 0.25) -> list[str]:
    """Two fresh instances with one seed keep the same tokens and answer the same."""
    a = engine.generate(batch, factory(budget=budget, seed=3), max_new_tokens=3)
    b = engine.generate(batch, factory(budget=budget, seed=3), max_new_tokens=3)
    out = []
    if a.kept_indices != b.kept_indices:
        out.append("two runs with the same seed kept different tokens")
    if not torch.equal(a.tokens, b.tokens):
        out.append("two runs with the same seed answered differently")
    return out


def check_full_budget(engine, factory: Factory, batch: dict, tol: float = 1e-4) -> list[str]:
    """At rho = 1 the method is the unpruned model (the sweep reuses `none`'s cell for it)."""
    ref, mask = engine.logits(batch, None)
    got, _ = engine.logits(batch, factory(budget=1.0, seed=0))
    if got.shape != ref.shape:
        return [f"at rho = 1 the sequence has {got.shape[1]} positions, the unpruned model {ref.shape[1]}"]
    diff = float((got - ref)[mask].abs().max())
    return [] if diff < tol else [f"at rho = 1 the logits differ from the unpruned model's by {diff:.3g}"]


def check_batch_equals_rows(engine, factory: Factory, batch: dict, budget: float = 0.25) -> list[str]:
    """A batch gives each row what the row gives alone (no leak through padding or batching)."""
    method = factory(budget=budget, seed=1)
    together = engine.generate(batch, method, max_new_tokens=3)
    out, pad = [], engine.pad_id  # a batch pads rows that stopped early at EOS
    for i in range(batch["input_ids"].shape[0]):
        alone = engine.generate(_row(engine, batch, i), method, max_new_tokens=3)
        if alone.kept_indices[0] != together.kept_indices[i]:
            out.append(f"row {i} keeps other tokens in a batch than alone")
        if [t for t in alone.tokens[0].tolist() if t != pad] != [t for t in together.tokens[i].tolist() if t != pad]:
            out.append(f"row {i} answers differently in a batch than alone")
    return out


def check_plan_pure(engine, factory: Factory, batch: dict, budget: float = 0.25) -> list[str]:
    """`plan` sets no attribute and returns the same plan before and after a `select`: the
    engine, FLOPs count and sweep all call it, so state kept there leaks between models."""
    method = factory(budget=budget, seed=0)
    info = row_infos(engine, batch)[1][0]
    before = dict(vars(method))
    first = method.plan(info)
    after = vars(method)
    out = []
    changed = sorted(k for k in set(before) | set(after) if k not in before or k not in after or before[k] is not after[k])
    if changed:
        out.append(f"plan() set attribute(s) {', '.join(changed)}; compute them from `info` / `ctx.info` instead")
    engine.generate(batch, method, max_new_tokens=1)
    if method.plan(info) != first:
        out.append("plan() returned a different plan after select() ran")
    return out


def check_params(name: str) -> list[str]:
    """The registered method loads, declares a known accounting and typed parameters, rebuilds
    from its own `describe_params()` (also from their string forms, as the CLI passes them),
    refuses an unknown parameter with one GripbenchError line, and has a provenance."""
    reg, out = registry(), []
    try:
        cls = reg.load(name)
        specs = param_specs(cls)
    except GripbenchError as e:
        return [str(e)]
    if cls.accounting not in ACCOUNTINGS:
        out.append(f"accounting {cls.accounting!r} is not one of {', '.join(ACCOUNTINGS)}")
    try:
        params = reg.create(name, budget=0.5).describe_params()
        json.dumps(params)
        if set(params) != set(specs):
            out.append(f"describe_params() keys {sorted(params)} are not the declared parameters {sorted(specs)}")
        if reg.create(name, budget=0.5, **params).describe_params() != params:
            out.append("create(**describe_params()) does not rebuild the same parameters")
        as_text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
        if reg.create(name, budget=0.5, **as_text).describe_params() != params:
            out.append("the parameters' string forms (what the CLI passes) do not convert back to their values")
    except (GripbenchError, TypeError, ValueError) as e:
        out.append(f"parameters: {type(e).__name__}: {e}")
    try:
        reg.create(name, budget=0.5, no_such_parameter="1")
        out.append("an unknown parameter was accepted")
    except GripbenchError as e:
        if name not in str(e) or "\n" in str(e):
            out.append(f"the unknown-parameter error should be one line naming the method: {e}")
    try:
        prov = reg.provenance(name)
        if not re.fullmatch(r"[0-9a-f]{64}", prov.get("source_sha256") or ""):
            out.append(f"provenance has no source hash: {prov}")
    except (GripbenchError, OSError) as e:
        out.append(f"provenance: {e}")
    return out


MODEL_CHECKS: dict[str, Callable[..., list[str]]] = {
    "plan is pure": check_plan_pure,
    "budget honoured by its accounting": check_accounting,
    "deterministic": check_deterministic,
    "rho = 1 is the unpruned model": check_full_budget,
    "batch of 4 = one by one": check_batch_equals_rows,
}


@dataclass
class CheckResult:
    check: str
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def line(self) -> str:
        return f"PASS  {self.check}" if self.passed else f"FAIL  {self.check}: " + "; ".join(self.failures)


def _run(check: str, fn, *args) -> CheckResult:
    try:
        return CheckResult(check, fn(*args))
    except Exception as e:  # a method that crashes fails the check, it does not stop the others
        return CheckResult(check, [f"raised {type(e).__name__}: {e}"])


def run_checks(engine, factory: Factory, batch: dict | None = None, name: str | None = None) -> list[CheckResult]:
    """Every contract check: the registry/parameter check when `name` is registered, then the
    model checks with `factory` (default: `method_factory(name)`)."""
    batch = contract_batch(engine) if batch is None else batch
    results = [_run("registry and parameters", check_params, name)] if name is not None else []
    return results + [_run(check, fn, engine, factory, batch) for check, fn in MODEL_CHECKS.items()]


def assert_contract(results: list[CheckResult]) -> None:
    """AssertionError listing every failed check (for pytest files)."""
    failed = [r.line() for r in results if not r.passed]
    assert not failed, "\n".join(failed)
