"""`gripbench check`: regression gates of a results folder against a reference folder.

Every (model, task, method, method_params, budget) cell present on both sides is compared:

- accuracy regresses only if it drops by more than the tolerance AND the drop is
  significant under an exact McNemar test on the per-sample correctness of the samples
  both runs share (so a noisy 2-point wobble on 100 samples does not fail CI, and a real
  drop within tolerance does not either);
- FLOPs must match exactly: they are analytic and deterministic, so any change is a change
  of the method or of the accounting and must be looked at;
- latency is compared as the ratio of the cell's `latency_e2e_ms` to `none`'s, timed on
  the same batch interleaved with the method's own runs (`latency_none_e2e_ms`; results
  written before that column existed fall back to the `none` cell of the same task in the
  same run), which cancels the machine's speed and its load; the ratio may grow by at most
  the tolerance (relative).

Cells on one side only are listed (and fail with `fail_on_missing`). Tolerances come from
the command line or a TOML file (`[check]` table with `acc = -0.02`,
`latency_ratio = "+10%"`, `alpha = 0.05`); the command line wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import tomllib

from gripbench.analysis import mcnemar, paired, ratio_to_none
from gripbench.errors import GripbenchError
from gripbench.store import ResultsStore

KEY = ["model", "task", "method", "method_params", "budget"]
LATENCY = "latency_e2e_ms"
PAIRED = "latency_none_e2e_ms"  # none timed interleaved with the cell's own runs


@dataclass(frozen=True)
class Tolerances:
    acc: float = 0.02  # largest accuracy drop (fraction) that never counts as a regression
    latency_ratio: float = 0.25  # largest relative growth of the latency ratio to `none`
    alpha: float = 0.05  # significance level of the paired test
    fail_on_missing: bool = False


def parse_tolerance(text: str, tol: Tolerances = Tolerances()) -> Tolerances:
    """'acc:-0.02,latency_ratio:+10%,alpha:0.01' -> Tolerances. Signs are optional (an
    accuracy tolerance is a drop, a latency tolerance a growth); '%' divides by 100."""
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition(":")
        tol = _set(tol, name.strip(), value.strip())
    return tol


def _number(value) -> float:
    text = str(value).strip()
    try:
        return abs(float(text[:-1]) / 100 if text.endswith("%") else float(text))
    except ValueError:
        raise GripbenchError(f"bad tolerance value {value!r} (expected e.g. -0.02, +10%)") from None


def _set(tol: Tolerances, name: str, value) -> Tolerances:
    if name in ("acc", "accuracy"):
        return replace(tol, acc=_number(value))
    if name in ("latency", "latency_ratio"):
        return replace(tol, latency_ratio=_number(value))
    if name == "alpha":
        return replace(tol, alpha=_number(value))
    if name == "fail_on_missing":
        return replace(tol, fail_on_missing=bool(value))
    raise GripbenchError(f"unknown tolerance {name!r} (acc, latency_ratio, alpha, fail_on_missing)")


def load_config(path: str | Path, tol: Tolerances = Tolerances()) -> Tolerances:
    """Tolerances from the `[check]` table of a TOML file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise GripbenchError(f"cannot read check config {path}: {e}") from None
    for name, value in data.get("check", {}).items():
        tol = _set(tol, name, value)
    return tol


def _load(folder: str | Path, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not Path(folder).is_dir():
        raise GripbenchError(f"{what} folder {folder} does not exist")
    store = ResultsStore(folder)
    return store.cells(), store.samples()


def latency_ratios(cells: pd.DataFrame) -> pd.Series:
    """Each cell's end-to-end latency divided by `none`'s measured beside it (paired runs,
    `latency_none_e2e_ms`), or, where that is missing, by the `none` cell of its (model, task)."""
    fallback = ratio_to_none(cells, LATENCY)
    if PAIRED not in cells:
        return fallback
    return (cells[LATENCY] / cells[PAIRED]).fillna(fallback)


def compare(results: str | Path, reference: str | Path, tol: Tolerances = Tolerances()) -> pd.DataFrame:
    """One row per finding: key columns, metric, reference, result, change, verdict
    (`regressed`, `improved`, `changed`, `missing`, `new`). Unchanged cells give no row."""
    cells, samples = _load(results, "results")
    ref_cells, ref_samples = _load(reference, "reference")
    cells = cells.assign(latency_ratio=latency_ratios(cells))
    ref_cells = ref_cells.assign(latency_ratio=latency_ratios(ref_cells))
    merged = ref_cells.merge(cells, on=KEY, how="outer", suffixes=("_ref", "_new"), indicator=True)
    both = pd.concat([ref_samples.assign(config_hash="ref:" + ref_samples["config_hash"]),
                      samples.assign(config_hash="new:" + samples["config_hash"])])  # one table, two runs
    rows = []

    def add(r, metric, ref, new, verdict, detail=""):
        rows.append({**{k: r[k] for k in KEY}, "metric": metric, "reference": ref, "result": new,
                     "change": (new - ref) if ref is not None and new is not None else np.nan,
                     "verdict": verdict, "detail": detail})

    for _, r in merged.iterrows():
        if r["_merge"] == "left_only":
            add(r, "cell", None, None, "missing", "in the reference only")
            continue
        if r["_merge"] == "right_only":
            add(r, "cell", None, None, "new", "in the results only")
            continue
        a_ref, a_new = float(r["accuracy_ref"]), float(r["accuracy_new"])
        x, y = paired(both, "ref:" + r["config_hash_ref"], "new:" + r["config_hash_new"])
        p = mcnemar(x, y) if len(x) else 1.0
        if abs(a_new - a_ref) > tol.acc and p < tol.alpha:
            add(r, "accuracy", a_ref, a_new, "regressed" if a_new < a_ref else "improved",
                f"McNemar p={p:.2g} on {len(x)} paired samples")
        if "flops_total_ref" in r and r["flops_total_ref"] != r["flops_total_new"]:
            add(r, "flops_total", float(r["flops_total_ref"]), float(r["flops_total_new"]),
                "regressed" if r["flops_total_new"] > r["flops_total_ref"] else "changed", "FLOPs are deterministic")
        lr, ln = float(r["latency_ratio_ref"]), float(r["latency_ratio_new"])
        if r["method"] != "none" and np.isfinite(lr) and np.isfinite(ln):
            if ln > lr * (1 + tol.latency_ratio):
                add(r, "latency_ratio", lr, ln, "regressed", f"e2e latency / none's, limit +{tol.latency_ratio:.0%}")
            elif ln < lr * (1 - tol.latency_ratio):
                add(r, "latency_ratio", lr, ln, "improved", "e2e latency / none's")
    return pd.DataFrame(rows, columns=[*KEY, "metric", "reference", "result", "change", "verdict", "detail"])


def failed(findings: pd.DataFrame, tol: Tolerances) -> bool:
    bad = {"regressed"} | ({"missing"} if tol.fail_on_missing else set())
    return bool(findings["verdict"].isin(bad).any())


def render(findings: pd.DataFrame) -> str:
    """A readable table, regressions first."""
    if findings.empty:
        return "no regression, no improvement: every cell matches the reference within tolerance"
    order = {"regressed": 0, "missing": 1, "changed": 2, "improved": 3, "new": 4}
    f = findings.assign(_o=findings["verdict"].map(order)).sort_values(["_o", "task", "method", "budget"]).drop(columns="_o")
    f = f.drop(columns=["model", "method_params"] if findings["method_params"].nunique() <= 1 else ["model"])

    def num(v):
        return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.4g}"

    for c in ("reference", "result", "change"):
        f[c] = f[c].map(num)
    counts = findings["verdict"].value_counts()
    head = ", ".join(f"{n} {v}" for v, n in counts.items())
    return f.to_string(index=False) + f"\n{head}"
