"""`gripbench check`: regression gates of a results folder against a reference folder.

Every (model, task, method, method_params, budget, limit, seed) cell present on both sides
is compared (`limit` and `seed` where both sides have those columns, so a folder holding two
seeds compares each seed with itself):

- accuracy regresses only if it drops by more than the tolerance AND the drop is
  significant under a paired test on the units both runs share (`analysis.paired_p`: exact
  McNemar on right/wrong answers, Wilcoxon signed-rank on soft scores; a unit is a sample,
  or MME's question pair), so a noisy 2-point wobble on 100 samples does not fail CI, and
  a real drop within tolerance does not either;
- FLOPs must match exactly: they are analytic and deterministic, so any change, up or
  down, is a change of the method or of the accounting and fails until it is looked at;
- latency is compared as the ratio of the cell's end-to-end latency to `none`'s, timed on
  the same batch interleaved with the method's own runs. Each timed repeat gives one paired
  ratio (`latency_ratio_runs`); a cell is slower only if the median of its paired ratios
  grows by more than the tolerance (relative) AND a one-sided Mann-Whitney U test of its
  per-run ratios against the reference's has p < alpha. Results without per-run ratios
  use `latency_e2e_ms / latency_none_e2e_ms` (or, older still, the `none` cell of the same
  task in the same run) and the tolerance alone. Contention changes the ratio itself
  (torch's threads wait on each other, small pruned ops suffer most), so when either side
  had less than `min_cpu_share` of its cores (`latency_cpu_share`: process CPU seconds /
  (wall seconds x torch threads) over the cell's timed runs) the finding is `unreliable`
  and does not fail; so is a cell timed while other cells could run on its node (Ray,
  `latency_concurrent`). With `latency_gate = "warn"` a latency regression is reported as
  `slower` and does not fail either.

Cells on one side only are listed (and fail with `fail_on_missing`). Tolerances come from
the command line or a TOML file (`[check]` table with `acc = -0.02`,
`latency_ratio = "+10%"`, `alpha = 0.05`, `min_cpu_share = 0.8`, `latency_gate = "warn"`,
`fail_on_missing = true`); the command line wins. A value that would silently disable a
gate (nan, inf, an alpha outside (0, 1), a boolean that is not one) is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import tomllib
from scipy.stats import mannwhitneyu

from gripbench.analysis import KEY, paired, paired_p, ratio_to_none
from gripbench.errors import BOOL_WORDS, GripbenchError
from gripbench.store import ResultsStore

LATENCY = "latency_e2e_ms"
PAIRED = "latency_none_e2e_ms"  # none timed interleaved with the cell's own runs
RUNS = "latency_ratio_runs"  # each timed repeat's e2e / the paired none e2e
CONCURRENT = "latency_concurrent"  # timed while other cells could run on the node: not gated
CPU_SHARE = "latency_cpu_share"  # ~1.0: the process had its cores; NaN: unknown (CUDA)
GATES = ("fail", "warn")
FAILING = {"regressed", "changed"}  # `changed`: FLOPs went down, which must be looked at too
ORDER = ["regressed", "changed", "missing", "slower", "unreliable", "improved", "new"]
RANGES = {  # tolerance: (valid, what it must be)
    "acc": (lambda v: 0 <= v <= 1, "a finite number in [0, 1] (the accuracy drop tolerated, e.g. -0.02 or 2%)"),
    "latency_ratio": (lambda v: v >= 0, "a finite number >= 0 (the growth of the latency ratio tolerated, e.g. +10%)"),
    "alpha": (lambda v: 0 < v < 1, "a finite number with 0 < alpha < 1"),
    "min_cpu_share": (lambda v: 0 < v <= 1, "a finite number in (0, 1]"),
}


@dataclass(frozen=True)
class Tolerances:
    acc: float = 0.02  # largest accuracy drop (fraction) that never counts as a regression
    latency_ratio: float = 0.25  # largest relative growth of the latency ratio to `none`
    alpha: float = 0.05  # significance level of the paired tests
    fail_on_missing: bool = False
    min_cpu_share: float = 0.8  # below it on either side the machine was shared: latency is not gated
    latency_gate: str = "fail"  # "warn": a latency regression is reported as `slower` and does not fail

    def __post_init__(self):
        """Reject every value that would make a gate vacuous: comparisons with nan are all False."""
        for name, (valid, what) in RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not valid(v):
                raise GripbenchError(f"tolerance {name} must be {what}, not {v!r}")
        if not isinstance(self.fail_on_missing, bool):
            raise GripbenchError(f"tolerance fail_on_missing must be true or false, not {self.fail_on_missing!r}")
        if self.latency_gate not in GATES:
            raise GripbenchError(f"tolerance latency_gate must be 'fail' or 'warn', not {self.latency_gate!r}")


def parse_tolerance(text: str, tol: Tolerances = Tolerances()) -> Tolerances:
    """'acc:-0.02,latency_ratio:+10%,alpha:0.01,latency_gate:warn' -> Tolerances. An accuracy
    tolerance is a drop, so its sign is optional; '%' divides by 100."""
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition(":")
        tol = set_tolerance(tol, name.strip(), value.strip())
    return tol


def _number(name: str, value, drop: bool = False) -> float:
    """A TOML number or a text such as '0.05', '+10%'; with `drop` a sign only says "a drop"."""
    text = str(value).strip()
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        x = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise GripbenchError(f"bad tolerance {name} value {value!r} (expected a number, e.g. -0.02 or +10%)") from None
    return abs(x) if drop else x


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    raise GripbenchError(f"bad tolerance {name} value {value!r} (expected true or false)")


def set_tolerance(tol: Tolerances, name: str, value) -> Tolerances:
    """`tol` with one tolerance set from a TOML value or a command-line text, validated."""
    if name in ("acc", "accuracy"):
        return replace(tol, acc=_number(name, value, drop=True))
    if name in ("latency", "latency_ratio"):
        return replace(tol, latency_ratio=_number(name, value))
    if name in ("alpha", "min_cpu_share"):
        return replace(tol, **{name: _number(name, value)})
    if name == "fail_on_missing":
        return replace(tol, fail_on_missing=_bool(name, value))
    if name == "latency_gate":
        return replace(tol, latency_gate=value.strip().lower() if isinstance(value, str) else value)
    raise GripbenchError(f"unknown tolerance {name!r} (acc, latency_ratio, alpha, min_cpu_share, latency_gate, fail_on_missing)")


def load_config(path: str | Path, tol: Tolerances = Tolerances()) -> Tolerances:
    """Tolerances from the `[check]` table of a TOML file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise GripbenchError(f"cannot read check config {path}: {e}") from None
    table = data.get("check", {})
    if not isinstance(table, dict):
        raise GripbenchError(f"check config {path}: `check` must be a [check] table of tolerances, not {table!r}")
    try:
        for name, value in table.items():
            tol = set_tolerance(tol, name, value)
    except GripbenchError as e:
        raise GripbenchError(f"check config {path}: {e}") from None
    return tol


def _load(folder: str | Path, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not Path(folder).is_dir():
        raise GripbenchError(f"{what} folder {folder} does not exist")
    store = ResultsStore(folder)
    return store.cells(), store.samples()


def _runs(value) -> np.ndarray | None:
    """The finite per-run ratios of one cell; None where the column is absent or empty."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        return None
    runs = np.asarray(value, dtype=float)
    runs = runs[np.isfinite(runs)]
    return runs if len(runs) else None


def latency_ratios(cells: pd.DataFrame) -> pd.Series:
    """Each cell's latency ratio to `none`: the median of its paired per-run ratios
    (`latency_ratio_runs`), else its e2e latency divided by `none`'s measured beside it
    (`latency_none_e2e_ms`), else by the `none` cell of its (model, task) in the same run."""
    ratio = ratio_to_none(cells, LATENCY)
    if PAIRED in cells:
        ratio = (cells[LATENCY] / cells[PAIRED]).fillna(ratio)
    if RUNS in cells:
        ratio = cells[RUNS].map(lambda v: np.nan if (r := _runs(v)) is None else float(np.median(r))).fillna(ratio)
    return ratio


def _prepare(cells: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """The columns the gates read, present on every side (absent ones as NaN/None), so the
    merge suffixes all of them."""
    return pd.DataFrame({**{k: cells[k] for k in key}, "config_hash": cells["config_hash"], "accuracy": cells["accuracy"],
                         "flops_total": cells.get("flops_total", np.nan), "latency_ratio": latency_ratios(cells),
                         "runs": cells.get(RUNS),
                         "cpu_share": cells.get(CPU_SHARE, np.nan),
                         "concurrent": pd.to_numeric(cells.get(CONCURRENT, False), errors="coerce")}, index=cells.index)


def _latency(r, tol: Tolerances) -> tuple[str, str] | None:
    """(verdict, detail) of one cell's latency, or None when it did not move beyond noise."""
    lr, ln = float(r["latency_ratio_ref"]), float(r["latency_ratio_new"])
    if r["method"] == "none" or not (np.isfinite(lr) and np.isfinite(ln)):
        return None
    if ln > lr * (1 + tol.latency_ratio):
        verdict, side = ("regressed" if tol.latency_gate == "fail" else "slower"), "greater"
    elif ln < lr * (1 - tol.latency_ratio):
        verdict, side = "improved", "less"
    else:
        return None
    detail = f"median paired ratio {ln / lr - 1:+.0%} (tolerance {100 * tol.latency_ratio:g}%)"
    x, y = _runs(r["runs_new"]), _runs(r["runs_ref"])
    if x is None or y is None:
        detail += "; no per-run ratios: tolerance alone"
    else:
        p = float(mannwhitneyu(x, y, alternative=side).pvalue)
        if not p < tol.alpha:
            return None
        detail += f"; Mann-Whitney p={p:.2g} on {len(x)} vs {len(y)} runs"
    if r["concurrent_new"] == 1 or r["concurrent_ref"] == 1:
        return "unreliable", "timed while other cells shared its node (Ray, latency_concurrent); latency not gated"
    share, share_ref = float(r["cpu_share_new"]), float(r["cpu_share_ref"])
    if share < tol.min_cpu_share or share_ref < tol.min_cpu_share:  # NaN (unknown, CUDA) compares False: uncontended
        return "unreliable", f"machine busy: cpu share {_share(share)} (reference {_share(share_ref)}); latency not gated"
    return verdict, detail


def _share(value: float) -> str:
    return "unknown" if np.isnan(value) else f"{value:.2f}"


def compare(results: str | Path, reference: str | Path, tol: Tolerances = Tolerances()) -> pd.DataFrame:
    """One row per finding: key columns, metric, reference, result, change, verdict
    (`regressed`, `changed`, `slower`, `unreliable`, `improved`, `missing`, `new`).
    Unchanged cells give no row."""
    cells, samples = _load(results, "results")
    ref_cells, ref_samples = _load(reference, "reference")
    key = [k for k in KEY if k in cells and k in ref_cells]
    merged = _prepare(ref_cells, key).merge(_prepare(cells, key), on=key, how="outer", suffixes=("_ref", "_new"),
                                            indicator=True)
    both = pd.concat([ref_samples.assign(config_hash="ref:" + ref_samples["config_hash"]),
                      samples.assign(config_hash="new:" + samples["config_hash"])])  # one table, two runs
    rows = []

    def add(r, metric, ref, new, verdict, detail=""):
        rows.append({**{k: r[k] for k in key}, "metric": metric, "reference": ref, "result": new,
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
        p = paired_p(x, y) if len(x) else 1.0
        if abs(a_new - a_ref) > tol.acc and p < tol.alpha:
            add(r, "accuracy", a_ref, a_new, "regressed" if a_new < a_ref else "improved",
                f"paired p={p:.2g} on {len(x)} units")
        f_ref, f_new = float(r["flops_total_ref"]), float(r["flops_total_new"])
        if f_ref != f_new and not (np.isnan(f_ref) and np.isnan(f_new)):
            add(r, "flops_total", f_ref, f_new, "regressed" if f_new > f_ref else "changed",
                "FLOPs are deterministic: any difference fails")
        if (latency := _latency(r, tol)) is not None:
            add(r, "latency_ratio", float(r["latency_ratio_ref"]), float(r["latency_ratio_new"]), *latency)
    return pd.DataFrame(rows, columns=[*key, "metric", "reference", "result", "change", "verdict", "detail"])


def failed(findings: pd.DataFrame, tol: Tolerances) -> bool:
    bad = FAILING | ({"missing"} if tol.fail_on_missing else set())
    return bool(findings["verdict"].isin(bad).any())


def latency_rule(tol: Tolerances) -> str:
    """The latency gate in words, as applied with `tol`."""
    action = "a slower cell fails" if tol.latency_gate == "fail" else "a slower cell only warns (latency_gate warn)"
    return (f"latency: median paired ratio to none +{100 * tol.latency_ratio:g}% and Mann-Whitney p < {tol.alpha:g} "
            f"(tolerance alone without per-run ratios), not gated below cpu share {tol.min_cpu_share:g}, {action}")


def rules(tol: Tolerances) -> str:
    """Every gate in words, for the final line of `gripbench check`."""
    return f"acc tolerance -{tol.acc:g} with paired p < {tol.alpha:g}, FLOPs exact, {latency_rule(tol)}"


def render(findings: pd.DataFrame, tol: Tolerances = Tolerances()) -> str:
    """A readable table, failures first, then the latency rule that produced it."""
    if findings.empty:
        return f"no regression, no improvement: every cell matches the reference within tolerance\n{latency_rule(tol)}"
    f = findings.assign(_o=findings["verdict"].map(ORDER.index)).sort_values(["_o", "task", "method", "budget"])
    same = [c for c in ("method_params", "limit", "seed") if c in f and f[c].nunique(dropna=False) <= 1]
    f = f.drop(columns=["_o", "model", *same])

    def num(v):
        return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.4g}"

    for c in ("reference", "result", "change"):
        f[c] = f[c].map(num)
    counts = findings["verdict"].value_counts()
    head = ", ".join(f"{n} {v}" for v, n in counts.items())
    return f.to_string(index=False) + f"\n{head}\n{latency_rule(tol)}"
