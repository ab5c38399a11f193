"""Analysis functions on hand-made numbers whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gripbench import analysis


def frame(points):
    """points: (method, budget, cost, accuracy) on one task."""
    return pd.DataFrame([{"model": "m", "task": "t", "method": m, "method_params": "{}", "budget": b, "cost": c,
                          "flops_total": c, "accuracy": a, "config_hash": f"{m}{b}"} for m, b, c, a in points])


def test_pareto_frontier_keeps_exactly_the_non_dominated_cells():
    df = frame([("none", 1, 10, 0.9), ("a", 0.5, 5, 0.85), ("b", 0.5, 5, 0.80), ("a", 0.25, 3, 0.6),
                ("b", 0.25, 4, 0.6), ("c", 0.1, 1, 0.3)])
    on = analysis.pareto_frontier(df, "cost")
    assert list(zip(df[on].method, df[on].budget)) == [("none", 1), ("a", 0.5), ("a", 0.25), ("c", 0.1)]


def test_min_cost_at_interpolates_between_points():
    costs, values = np.array([1.0, 2.0, 4.0]), np.array([0.5, 0.9, 1.0])
    assert analysis.min_cost_at(costs, values, 0.7) == pytest.approx(1.5)
    assert analysis.min_cost_at(costs, values, 0.95) == pytest.approx(3.0)
    assert analysis.min_cost_at(costs, values, 0.4) == 1.0
    assert np.isnan(analysis.min_cost_at(costs, values, 1.01))


def test_iso_accuracy_speedup_is_the_cost_ratio_at_equal_retention():
    df = frame([("none", 1, 10, 1.0), ("fast", 1, 10, 1.0), ("fast", 0.5, 4, 0.95),
                ("slow", 1, 10, 1.0), ("slow", 0.5, 6, 0.95)])
    iso = analysis.iso_accuracy(df, "cost", targets=(0.95,))
    assert dict(zip(iso.method, iso.cost)) == {"fast": 4.0, "slow": 6.0}
    sp = analysis.speedups(iso).set_index(["method", "other"])["speedup"]
    assert sp[("fast", "slow")] == pytest.approx(1.5) and sp[("slow", "fast")] == pytest.approx(1 / 1.5)


def test_retention_and_auc():
    df = frame([("none", 1, 10, 0.8), ("flat", 1, 10, 0.8), ("flat", 0.1, 1, 0.8),
                ("drop", 1, 10, 0.8), ("drop", 0.1, 1, 0.0)])
    assert list(analysis.retention(df)) == [1.0, 1.0, 1.0, 1.0, 0.0]
    auc = analysis.normalized_auc(df, "cost").set_index("method")["auc"]
    assert auc["flat"] == pytest.approx(1.0)
    assert auc["drop"] == pytest.approx(0.5)  # linear from 0 at 0.1 to 1 at 1.0


def test_mcnemar_exact_values():
    a = np.array([1] * 10 + [0] * 5, bool)
    b = np.array([0] * 10 + [0] * 5, bool)
    assert analysis.mcnemar(a, b) == pytest.approx(2 * 0.5 ** 10)
    assert analysis.mcnemar(a, a) == 1.0
    c = np.array([1, 0] * 10, bool)
    assert analysis.mcnemar(c, ~c) == pytest.approx(1.0)  # 10 vs 10 discordant: no evidence


def _frame(scores, units=None, strata=None):
    import pandas as pd

    n = len(scores)
    return pd.DataFrame({"score": np.asarray(scores, float), "unit": units or [str(i) for i in range(n)],
                         "stratum": strata or [""] * n})


def test_bootstrap_ci_is_deterministic_and_brackets_the_mean():
    x = (np.random.default_rng(0).random(300) < 0.7).astype(float)
    lo, hi = analysis.bootstrap_ci(_frame(x), seed=3)
    assert (lo, hi) == analysis.bootstrap_ci(_frame(x), seed=3)
    assert lo < x.mean() < hi and 0.08 < hi - lo < 0.12  # about 2 x 1.96 x sqrt(.21/300)


def test_pair_units_follow_mme_acc_plus():
    """MME: a category's score is acc + acc+ over its question pairs; the statistic (halved,
    averaged over categories) and the unit values follow that, by hand."""
    # category A: pair 1 both right, pair 2 one right; category B: pair 3 none right
    f = _frame([1, 1, 1, 0, 0, 0], units=["A/1", "A/1", "A/2", "A/2", "B/3", "B/3"], strata=["A"] * 4 + ["B"] * 2)
    units = analysis.unit_values(f).set_index("unit")["value"]
    assert units.to_dict() == {"A/1": 1.0, "A/2": 0.25, "B/3": 0.0}
    # A: acc 75 + acc+ 50 = 125; B: 0; MME total 125 over 2 categories x 200 = 0.3125
    assert analysis.statistic(f) == pytest.approx(125 / 400)
    lo, hi = analysis.bootstrap_ci(f, seed=0)
    assert lo <= analysis.statistic(f) <= hi


def test_paired_p_uses_mcnemar_on_binary_and_wilcoxon_on_soft_scores():
    from scipy.stats import wilcoxon

    a = np.array([1] * 10 + [0] * 5, float)
    b = np.zeros(15)
    assert analysis.paired_p(a, b) == pytest.approx(analysis.mcnemar(a, b))
    soft_a, soft_b = np.linspace(0.3, 1.0, 12), np.linspace(0.3, 1.0, 12) - 0.2
    assert analysis.paired_p(soft_a, soft_b) == pytest.approx(wilcoxon(soft_a, soft_b).pvalue)
    assert analysis.paired_p(soft_a, soft_a) == 1.0


def test_significance_against_the_best_other_method(tmp_path):
    from conftest import synthetic_results

    from gripbench.store import ResultsStore

    store = ResultsStore(synthetic_results(tmp_path / "r", n=200))
    sig = analysis.significance(store.cells(), store.samples())
    row = sig[(sig.method == "weak") & (sig.budget == 0.25)].iloc[0]
    assert row["best_other"] == "good" and row["diff"] < 0 and row["significant"] and row["n_paired"] == 200
    same = sig[(sig.method == "good") & (sig.budget == 1.0)].iloc[0]
    assert same["diff"] == 0 and not same["significant"]


def test_with_overall_and_summary_table(tmp_path):
    from conftest import synthetic_results

    from gripbench.store import ResultsStore

    cells = ResultsStore(synthetic_results(tmp_path / "r")).cells()
    table = analysis.summary_table(cells)
    overall = table[("accuracy", "overall")]
    per_task = table["accuracy"].drop(columns="overall").mean(axis=1)
    assert np.allclose(overall, per_task)
    assert table.loc[("none", 1.0), ("retention", "overall")] == pytest.approx(1.0)


def test_curves_end_at_the_shared_full_token_point():
    # a reaches 99% retention only at full cost: without its own budget-1 cell the `none` cell stands in
    df = frame([("none", 1, 10, 0.9), ("a", 0.5, 5, 0.85), ("b", 1, 11, 0.9), ("b", 0.5, 5, 0.80)])
    full = analysis.with_full_point(df)
    added = full[full.shared_full_point]
    assert list(zip(added.method, added.budget, added.cost)) == [("a", 1.0, 10)]  # b ran its own budget-1 cell
    iso = analysis.iso_accuracy(df, "cost", targets=(0.99,)).set_index("method")["cost"]
    ra = 0.85 / 0.9  # a's retention at cost 5; 1.0 at the shared point (cost 10)
    assert iso["a"] == pytest.approx(5 + 5 * (0.99 - ra) / (1 - ra))
    rb = 0.80 / 0.9  # b: its own budget-1 cell, cost 11
    assert iso["b"] == pytest.approx(5 + 6 * (0.99 - rb) / (1 - rb))


def test_retention_is_nan_without_none_or_against_none_at_zero():
    zero = frame([("none", 1, 10, 0.0), ("a", 0.5, 5, 0.4)])
    assert analysis.retention(zero).isna().all()  # 0/0 and 0.4/0: undefined, never inf
    alone = frame([("a", 1, 10, 0.8), ("a", 0.5, 5, 0.4)])
    assert analysis.retention(alone).isna().all()
    for df in (zero, alone):  # the summary keeps its retention columns, all NaN
        table = analysis.summary_table(df)
        assert list(table["retention"].columns) == list(table["accuracy"].columns) and table["retention"].isna().all().all()


def test_seeds_are_kept_apart_then_averaged():
    df = pd.concat([frame([("none", 1, 10, 0.8), ("a", 0.5, 5, 0.6)]).assign(seed=0),
                    frame([("none", 1, 10, 0.4), ("a", 0.5, 5, 0.4)]).assign(seed=1)], ignore_index=True)
    assert list(analysis.retention(df)) == pytest.approx([1.0, 0.75, 1.0, 1.0])  # each seed against its own `none`
    mean = analysis.mean_over_seeds(df).set_index("method")
    assert mean.loc["a", "accuracy"] == pytest.approx(0.5) and mean.loc["none", "accuracy"] == pytest.approx(0.6)
    assert list(mean["n_seeds"]) == [2, 2] and "seed" not in mean
    assert "n_seeds" not in analysis.mean_over_seeds(df[df.seed == 0])  # one seed: the cells as they are
