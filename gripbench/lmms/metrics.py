"""Each task scored by its own metric, as lmms-eval computes it.

A cell's accuracy is the task's headline metric: the first metric of its YAML's
`metric_list` (what the task's authors report first: pope_accuracy, mme_perception_score,
textvqa's soft `exact_match`, chartqa's `relaxed_overall`, ocrbench_accuracy, ANLS, ...)
under the task's first filter, read from lmms-eval's own aggregate. Each sample keeps the
score that the task's `process_results` gave it, a float in [0, 1] (a number, or the `score`
of the dict that pope, mme and ocrbench return), for paired statistics.

How a cell's numbers relate to lmms-eval's (checked on every cell, never assumed):
- `metric_value` is lmms-eval's aggregate exactly as it reports it, in its own units;
- `accuracy` is the same figure on [0, 1]: equal to `metric_value` when that is the mean
  of the per-sample scores, `metric_value / 100` when the task reports percent; for the
  aggregates that are not means, a rule named in `STRUCTURED` (MME: acc + acc+ over
  question pairs, summed over categories; OCRBench: a sum divided by 1000, the full
  benchmark's size, whatever `--limit`), recomputed here and compared with lmms-eval's.
  Any other relation is one line naming the task and the metric: never a silent 0.
- `score_mean` is the plain mean of the per-sample scores.

Statistics resample *units* that respect the task's structure: a unit is one sample, or
for MME one question pair (both questions of an image); a unit's value is its samples'
mean, or for a pair MME's (acc + acc+) / 2. The statistic is the mean over strata (MME's
categories; one stratum elsewhere) of the mean unit value: with that, `accuracy` equals
`statistic(samples)` for every supported task, and CIs come from a stratified bootstrap
over units.

Traps of lmms-eval 0.7.3: OCRBench's aggregation adds into a module-level dict
(`OCRBench_score`) that is never reset, so evaluating the same loaded Task object twice
reports the sum of both. gripbench evaluates every cell by task name, and lmms-eval then
re-executes the task's utils.py, so each evaluation starts from zero (tests/test_stock_tasks.py
shows both). MME asserts that every question pair is whole (`pair_limit` rounds `--limit` up
to an even number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gripbench.analysis import statistic
from gripbench.errors import GripbenchError

# Words in a task's YAML or its folder's Python that mark a metric computed by an external
# LLM judge (MMBench's GPT matching, MM-Vet, LLaVA-Bench, MathVista's extraction): offline it
# retries for minutes per answer, and online it costs money and moves with the judge's version.
JUDGE_MARKERS = ("openai", "OPENAI_API_KEY", "gpt_eval", "llm_judge", "get_chat_response", "API_TYPE")
PAIRED_METRICS = ("mme_perception_score", "mme_cognition_score")  # lmms-eval asserts whole question pairs


def judge_marker(yaml_path: str | None) -> str | None:
    """The first judge marker in the task's YAML or the Python files beside it, else None."""
    if not yaml_path:
        return None
    folder = Path(yaml_path).parent
    for f in [Path(yaml_path), *sorted(folder.glob("*.py"))]:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for m in JUDGE_MARKERS:
            if m in text:
                return f"{m!r} in {f.name}"
    return None


def task_config(yaml_path: str | None) -> dict:
    """The task's YAML as lmms-eval reads it (includes resolved, functions unresolved)."""
    if not yaml_path:
        return {}
    from lmms_eval.utils import load_yaml_config

    try:
        return load_yaml_config(yaml_path, mode="simple") or {}
    except Exception:  # noqa: BLE001 - a YAML lmms-eval itself cannot read fails there with its own message
        return {}


def is_paired(yaml_path: str | None) -> bool:
    metrics = [m.get("metric") for m in task_config(yaml_path).get("metric_list") or [] if isinstance(m, dict)]
    return any(m in PAIRED_METRICS for m in metrics)


def pair_limit(limit: int | None, yaml_path: str | None) -> int | None:
    """`--limit` for a task scored over question pairs: rounded up to keep the last pair whole."""
    if limit is None or limit % 2 == 0 or not is_paired(yaml_path):
        return limit
    return limit + 1


def rounded_limit_note(task: str, limit: int | None, rounded: int | None) -> str:
    """The line a sweep or eval prints when `pair_limit` rounded a task's --limit."""
    return f"{task}: --limit {limit} rounded up to {rounded} so its question pairs stay whole"


def sample_score(value, task: str, metric: str) -> float:
    """A per-sample metric value as a score in [0, 1]: a number or bool, or the `score` of a
    dict. Anything else is one line naming the task and the metric."""
    if isinstance(value, dict) and "score" in value:
        value = value["score"]
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        v = float(value)
        if not math.isnan(v) and 0.0 <= v <= 1.0:
            return v
        raise GripbenchError(f"task {task!r}: metric {metric!r} gave a per-sample score of {v:g}, outside [0, 1]; "
                             "gripbench cannot use it as an accuracy")
    raise GripbenchError(f"task {task!r}: gripbench cannot read a per-sample score from metric {metric!r} "
                         f"(a {type(value).__name__}, not a number or a dict with a 'score')")


def headline(config: dict, task: str, logged: list[dict]) -> tuple[str, str]:
    """(metric, filter) of the task's headline: the first metric of `metric_list` that its
    samples carry (MME's perception score, or its cognition score for a cognition-only
    subset), under the first filter of `filter_list` ('none' without one)."""
    metrics = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    filters = [f.get("name") for f in config.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
    present = [m for m in metrics if any(m in s for s in logged)]
    if not present:
        raise GripbenchError(f"task {task!r}: none of its metrics ({', '.join(metrics) or 'none listed'}) appears in its "
                             "per-sample results; gripbench cannot score it")
    return present[0], filters[0]


@dataclass
class CellMetric:
    metric: str  # lmms-eval's results key, e.g. 'pope_accuracy,none'
    metric_value: float  # lmms-eval's aggregate as reported
    accuracy: float  # the headline on [0, 1]
    score_mean: float  # mean of the per-sample scores
    unit: str  # 'sample' or 'question pair'
    samples: pd.DataFrame  # doc_id, score, unit, stratum


def read_cell(task: str, config: dict, results: dict, logged: list[dict]) -> CellMetric:
    """The cell's headline and per-sample scores from one `simple_evaluate` output."""
    metric, filt = headline(config, task, logged)
    key = f"{metric},{filt}"
    if key not in results:
        raise GripbenchError(f"task {task!r}: lmms-eval reported no {key!r} (it reported: "
                             f"{', '.join(k for k in results if ',' in k)})")
    try:
        value = float(results[key])
    except (TypeError, ValueError):
        raise GripbenchError(f"task {task!r}: lmms-eval's {key!r} is {results[key]!r}, not a number") from None
    rows = []
    for s in logged:
        if metric not in s:  # e.g. an MME cognition question when the headline is perception
            continue
        raw = s[metric]
        unit, stratum = str(s["doc_id"]), ""
        if metric in PAIRED_METRICS and isinstance(raw, dict):
            stratum = str(raw.get("category", ""))
            unit = f"{stratum}/{raw.get('question_id')}"
        rows.append({"doc_id": s["doc_id"], "score": sample_score(raw, task, metric), "unit": unit, "stratum": stratum})
    frame = pd.DataFrame(rows, columns=["doc_id", "score", "unit", "stratum"])
    mean = float(frame["score"].mean())
    stat = statistic(frame)
    if metric in PAIRED_METRICS:
        scale, unit_kind = 200.0 * frame["stratum"].nunique(), "question pair"
    elif metric == "ocrbench_accuracy":
        scale, unit_kind = len(frame) / 1000.0, "sample"  # lmms-eval divides the sum by 1000, the full set's size
    elif math.isclose(value, mean, rel_tol=1e-9, abs_tol=1e-9):
        scale, unit_kind = 1.0, "sample"
    elif math.isclose(value, 100 * mean, rel_tol=1e-9, abs_tol=1e-7):
        scale, unit_kind = 100.0, "sample"
    else:
        raise GripbenchError(f"task {task!r}: lmms-eval's {key} = {value:g} is not the mean of its per-sample scores "
                             f"({mean:g}) and gripbench knows no rule for it; cannot report an accuracy")
    accuracy = value / scale
    if not math.isclose(accuracy, stat, rel_tol=1e-9, abs_tol=1e-9):
        raise GripbenchError(f"task {task!r}: lmms-eval's {key} = {value:g} disagrees with gripbench's recomputation "
                             f"from the per-sample scores ({stat * scale:g}); refusing to report either")
    return CellMetric(key, value, accuracy, mean, unit_kind, frame)
