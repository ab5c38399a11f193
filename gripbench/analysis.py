"""Pure analysis of a results table: Pareto frontiers, retention, iso-accuracy speedups,
area under the accuracy-cost curve, paired significance and bootstrap CIs.

Every function takes pandas frames with the columns of the results schema (gripbench/schema.py)
(`cells.parquet`: one row per cell; `samples.parquet`: one row per sample per cell) and
returns a new frame; nothing here reads files or draws. "Overall" rows average the tasks
(macro average of accuracy and of cost), the way pruning papers report an average column.
A folder may hold several seeds (or limits) of one cell: `key` keeps them apart, and
`mean_over_seeds` folds them into one row for the tables and plots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import binomtest, wilcoxon

from gripbench import schema

COST_AXES = ("flops_total", "latency_prefill_ms", "tokens_llm_input")
KEY = list(schema.KEY)  # one experiment; defined once, in gripbench/schema.py
RUN = ["limit", "seed"]  # not in results written before these columns existed
OVERALL = "overall"


def key(cells: pd.DataFrame) -> list[str]:
    """The columns of KEY that `cells` has: what tells one cell from another."""
    return [c for c in KEY if c in cells]


def mean_over_seeds(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per cell but its seed: numeric columns averaged over the seeds (accuracy, CI
    bounds, costs), the others taken from the first seed, `n_seeds` counting them. Unchanged
    (no `n_seeds`) with a single seed."""
    if "seed" not in cells or cells["seed"].nunique(dropna=False) < 2:
        return cells
    group = [c for c in key(cells) if c != "seed"]
    rest = [c for c in cells.columns if c not in group and c != "seed"]
    numeric = [c for c in rest if pd.api.types.is_numeric_dtype(cells[c]) and not pd.api.types.is_bool_dtype(cells[c])]
    grouped = cells.groupby(group, dropna=False, sort=False)
    out = grouped[numeric].mean().join(grouped[[c for c in rest if c not in numeric]].first())
    return out.assign(n_seeds=grouped.size()).reset_index()[[*group, *rest, "n_seeds"]]


# Units: what CIs and paired tests resample (gripbench/lmms/metrics.py says why). A sample
# frame has `score` (in [0, 1]), `unit` and `stratum`; one sample is one unit except where a
# task scores groups (MME's question pairs).

def unit_values(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per unit: its stratum and value (the mean of its samples' scores, or for a
    unit of several samples, MME's (acc + acc+) / 2: half the mean plus half all-right)."""
    by = ["stratum", "unit"]
    g = samples.groupby(by, sort=True)["score"]
    mean, size = g.mean(), g.size()
    allright = samples.assign(right=samples["score"] >= 1.0).groupby(by, sort=True)["right"].all().astype(float)
    value = mean.where(size == 1, (mean + allright) / 2)
    return value.rename("value").reset_index()


def statistic(samples: pd.DataFrame) -> float:
    """Mean over strata of the mean unit value: the cell's accuracy recomputed from its samples."""
    if samples.empty:
        return float("nan")
    units = unit_values(samples)
    return float(units.groupby("stratum")["value"].mean().mean())


def bootstrap_ci(samples: pd.DataFrame, seed: int = 0, n: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic`: units resampled with replacement within each
    stratum (a pair stays a pair), `n` times under a fixed seed."""
    if samples.empty:
        return float("nan"), float("nan")
    units = unit_values(samples)
    rng = np.random.default_rng(seed)
    per_stratum = []
    for _, g in units.groupby("stratum", sort=True):
        v = g["value"].to_numpy(float)
        per_stratum.append(v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1))
    stats = np.mean(per_stratum, axis=0)
    alpha = (1 - level) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def with_overall(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells plus one `task == "overall"` row per (model, method, params, budget) present
    on every task: mean accuracy, mean CI bounds, mean of every numeric column."""
    tasks = cells["task"].nunique()
    if tasks < 2:
        return cells.copy()
    group = [c for c in key(cells) if c != "task"]
    numeric = [c for c in cells.columns if c not in KEY and pd.api.types.is_numeric_dtype(cells[c])]
    grouped = cells.groupby(group, dropna=False)
    overall = grouped[numeric].mean().reset_index()
    overall = overall[grouped.size().reset_index(drop=True).to_numpy() == tasks]
    overall["task"] = OVERALL
    return pd.concat([cells, overall], ignore_index=True)


def ratio_to_none(cells: pd.DataFrame, column: str) -> pd.Series:
    """Each cell's `column` divided by that of the `none` cell of its (model, task, limit,
    seed) in the same table; NaN where `none` (or the column) is absent or zero: a ratio to
    nothing is undefined, not infinite."""
    if column not in cells:
        return pd.Series(np.nan, index=cells.index)
    by = ["model", "task", *[c for c in RUN if c in cells]]
    none = cells.loc[cells["method"] == "none", [*by, column]].drop_duplicates(by).rename(columns={column: "_base"})
    base = cells[by].merge(none, on=by, how="left")["_base"].to_numpy(float)
    return cells[column] / np.where(base == 0, np.nan, base)


def retention(cells: pd.DataFrame) -> pd.Series:
    """accuracy / accuracy of `none` on the same (model, task); NaN where `none` is absent."""
    return ratio_to_none(cells, "accuracy")


def pareto_frontier(cells: pd.DataFrame, cost: str, acc: str = "accuracy") -> pd.Series:
    """True for the non-dominated cells of each (model, task): no other cell has cost <= and
    accuracy >= with one of them strict. Lower cost and higher accuracy are better."""
    on = pd.Series(False, index=cells.index)
    for _, g in cells.groupby(["model", "task"]):
        c, a = g[cost].to_numpy(float), g[acc].to_numpy(float)
        for i, idx in enumerate(g.index):
            dominated = (c <= c[i]) & (a >= a[i]) & ((c < c[i]) | (a > a[i]))
            on[idx] = not dominated.any()
    return on


def with_full_point(cells: pd.DataFrame) -> pd.DataFrame:
    """Give every method without a budget-1 cell the `none` cell of its (model, task) as that
    point (flagged `shared_full_point`): at rho = 1 a method keeps every token and answers
    as `none` does, and the sweep runs that point once (sweep.plan). Curves then end at the
    full-token point as in the papers' plots, so "reaches 99% only at full cost" reads as
    cost = none's cost instead of "never"."""
    if cells.empty or "none" not in set(cells["method"]):
        return cells
    extra = []
    for _, g in cells.groupby(["model", "task"]):
        full = g[g["method"] == "none"]
        if full.empty:
            continue
        have = set(g.loc[g["budget"] == 1.0, "method"])
        for m in sorted(set(g["method"]) - have):
            extra.append(full.iloc[[0]].assign(method=m, budget=1.0, shared_full_point=True))
    if not extra:
        return cells
    return pd.concat([cells.assign(shared_full_point=False), *extra], ignore_index=True)


def _curve(g: pd.DataFrame, cost: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    g = g.sort_values(cost)
    return g[cost].to_numpy(float), g[y].to_numpy(float)


def min_cost_at(costs: np.ndarray, values: np.ndarray, target: float) -> float:
    """Smallest cost at which the piecewise-linear curve through (cost, value) points, in
    increasing cost, first reaches `target`; NaN if it never does."""
    if len(costs) == 0:
        return float("nan")
    if values[0] >= target:
        return float(costs[0])
    for (c0, v0), (c1, v1) in zip(zip(costs[:-1], values[:-1]), zip(costs[1:], values[1:])):
        if v1 >= target:
            return float(c0 + (target - v0) / (v1 - v0) * (c1 - c0)) if v1 != v0 else float(c1)
    return float("nan")


def iso_accuracy(cells: pd.DataFrame, cost: str = "flops_total", targets=(0.95, 0.99)) -> pd.DataFrame:
    """Per (model, task, method, target retention): the minimal interpolated cost that reaches
    the target (`min_cost_at` on the retention-vs-cost curve). Rows: model, task, method,
    target, cost (NaN = never reached within the sweep's budgets). Curves end at the shared
    full-token point (`with_full_point`)."""
    cells = with_full_point(cells)
    data = cells.assign(retention=retention(cells))
    rows = []
    for (model, task, method), g in data[data["method"] != "none"].groupby(["model", "task", "method"]):
        c, r = _curve(g, cost, "retention")
        for t in targets:
            rows.append({"model": model, "task": task, "method": method, "target": t, "cost": min_cost_at(c, r, t)})
    return pd.DataFrame(rows, columns=["model", "task", "method", "target", "cost"])


def speedups(iso: pd.DataFrame) -> pd.DataFrame:
    """Pairwise iso-accuracy speedup: cost of `other` / cost of `method` at the same target
    retention (> 1: `method` is cheaper at equal accuracy, e.g. 1.15 = "15% faster").
    Rows: model, task, target, method, other, speedup (NaN if either never reaches it)."""
    rows = []
    for (model, task, target), g in iso.groupby(["model", "task", "target"]):
        costs = dict(zip(g["method"], g["cost"]))
        for m, cm in costs.items():
            for o, co in costs.items():
                if m != o:
                    rows.append({"model": model, "task": task, "target": target, "method": m, "other": o,
                                 "speedup": co / cm if cm and np.isfinite(cm) and np.isfinite(co) else np.nan})
    return pd.DataFrame(rows, columns=["model", "task", "target", "method", "other", "speedup"])


def normalized_auc(cells: pd.DataFrame, cost: str = "flops_total") -> pd.DataFrame:
    """Area under each method's retention-vs-cost curve, cost normalised by `none`'s cost,
    over the span [lo, 1] shared by all methods of the task (lo = the largest of the methods'
    smallest normalised costs), divided by the span: 1.0 = full accuracy at every cost.
    The curve is linear between measured points and flat beyond the last point, so a method
    is not rewarded for budgets it was not run at. Curves end at the shared full-token point
    (`with_full_point`)."""
    cells = with_full_point(cells)
    data = cells.assign(retention=retention(cells))
    rows = []
    for (model, task), g in data.groupby(["model", "task"]):
        full = g.loc[g["method"] == "none", cost]
        if full.empty:
            continue
        g = g[g["method"] != "none"]
        g = g.assign(x=g[cost] / float(full.iloc[0]))
        if g.empty:
            continue
        lo = g.groupby("method")["x"].min().max()
        grid = np.linspace(lo, 1.0, 201) if lo < 1 else np.array([1.0])
        for method, m in g.groupby("method"):
            x, r = _curve(m, "x", "retention")
            y = np.interp(grid, x, r)
            area = float(np.trapezoid(y, grid) / (grid[-1] - grid[0])) if len(grid) > 1 else float(y[0])
            rows.append({"model": model, "task": task, "method": method, "auc": area, "span_low": float(lo)})
    return pd.DataFrame(rows, columns=["model", "task", "method", "auc", "span_low"])


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact McNemar p-value (two-sided binomial test on the discordant pairs) for paired
    0/1 correctness vectors over the same samples; 1.0 when there is no discordant pair."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    if n01 + n10 == 0:
        return 1.0
    return float(binomtest(n10, n01 + n10, 0.5).pvalue)


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of a paired difference between two cells' unit values: the exact
    McNemar test where every value is 0 or 1 (right/wrong answers), else the Wilcoxon
    signed-rank test (soft scores such as VQA accuracy or ANLS, MME's pair values); 1.0 when
    no unit differs."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
        return mcnemar(a, b)
    if not (a != b).any():
        return 1.0
    return float(wilcoxon(a, b, zero_method="wilcox").pvalue)


def paired(samples: pd.DataFrame, hash_a: str, hash_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit values (`unit_values`) of two cells on the units they share, aligned."""
    def values(h: str) -> pd.Series:
        return unit_values(samples[samples["config_hash"] == h]).set_index(["stratum", "unit"])["value"]

    a, b = values(hash_a), values(hash_b)
    common = a.index.intersection(b.index)
    return a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)


def significance(cells: pd.DataFrame, samples: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Each method versus the best *other* method at the same (model, task, budget), within one
    seed (and limit): accuracy difference and a paired p-value on the units (`paired_p`). `none` is
    left out (it has no budget)."""
    rows = []
    run = [c for c in RUN if c in cells]
    data = cells[cells["method"] != "none"]
    for (model, task, budget, *_), g in data.groupby(["model", "task", "budget", *run], dropna=False):
        for _, row in g.iterrows():
            others = g[g["method"] != row["method"]]
            if others.empty:
                continue
            best = others.loc[others["accuracy"].idxmax()]
            a, b = paired(samples, row["config_hash"], best["config_hash"])
            p = paired_p(a, b) if len(a) else float("nan")
            rows.append({"model": model, "task": task, **{c: row[c] for c in run}, "budget": budget, "method": row["method"],
                         "best_other": best["method"], "diff": float(row["accuracy"] - best["accuracy"]),
                         "n_paired": len(a), "p_value": p, "significant": bool(p < alpha)})
    return pd.DataFrame(rows, columns=["model", "task", *run, "budget", "method", "best_other", "diff", "n_paired",
                                       "p_value", "significant"])


def summary_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The papers' table: one row per (method, budget), one accuracy and one retention column
    per task plus the overall average. `none` appears once, at budget 1. Retention is NaN
    without `none` or where its accuracy is 0, and keeps its column then."""
    data = with_overall(cells)
    data = data.assign(retention=retention(data))
    acc = data.pivot_table(index=["method", "budget"], columns="task", values="accuracy", aggfunc="first")
    ret = data.pivot_table(index=["method", "budget"], columns="task", values="retention", aggfunc="first")
    ret = ret.reindex(index=acc.index, columns=acc.columns)
    table = pd.concat({"accuracy": acc, "retention": ret}, axis=1)
    return table.sort_index(level=["budget", "method"], ascending=[False, True])
