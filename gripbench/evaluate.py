"""Programmatic evaluation: greedy decoding through the engine, exact match after normalisation.

The full sweep (lmms-eval, results store, FLOPs, latency) builds on `run_samples`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch

from gripbench.errors import GripbenchError, check_budget
from gripbench.tasks.suite import load_split

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}


def normalize(text: str) -> str:
    """Lower-case, first word, punctuation stripped, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if not words:
        return ""
    return _NUMBERS.get(words[0], words[0])


@dataclass
class SampleResult:
    sample_id: str
    prediction: str
    target: str
    correct: bool
    kept_indices: list[int]
    tokens_llm_input: int
    tokens_layer_avg: float


def run_samples(engine, samples, method, batch_size: int = 64, max_new_tokens: int = 3,
                before_batch=None) -> list[SampleResult]:
    """Answer every sample with `method` pruning; `before_batch(chunk)` lets diagnostics
    (the evidence oracle) see the batch's samples first."""
    results = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        if before_batch is not None:
            before_batch(chunk)
        batch = engine.prepare([s.image for s in chunk], [s.question for s in chunk])
        gen = engine.generate(batch, method, max_new_tokens=max_new_tokens)
        for j, s in enumerate(chunk):
            pred = normalize(gen.texts[j])
            results.append(SampleResult(s.id, pred, s.answer, pred == s.answer, gen.kept_indices[j],
                                        gen.tokens_llm_input[j], gen.tokens_layer_avg[j]))
    return results


def accuracy(results: list[SampleResult]) -> float:
    return sum(r.correct for r in results) / max(1, len(results))


def evaluate_tasks(model: str = "embedded", method: str = "none", budget: float = 1.0, tasks="all",
                   limit: int | None = None, batch_size: int = 64, seed: int = 0, out=sys.stdout,
                   params: dict | None = None, include_path=None, allow_judge: bool = False) -> dict[str, float]:
    """Accuracy per task for one method at one budget; prints a small table.

    The embedded tasks are answered directly through the engine (the fast path, exact match);
    any other lmms-eval task (or a mix) runs through lmms-eval and is scored by its own
    metric, as in a sweep (gripbench/lmms/metrics.py)."""
    from gripbench.engine import Engine
    from gripbench.lmms.tasks import PREFIX
    from gripbench.methods import create_method
    from gripbench.sweep import check_data, resolve_tasks
    from gripbench.zoo import check_model, load

    budget = check_budget(budget)
    if limit is not None and limit < 1:
        raise GripbenchError("--limit must be at least 1")
    paths = resolve_tasks(",".join(tasks) if isinstance(tasks, list) else tasks, include_path, allow_judge)
    m = create_method(method, budget=budget, seed=seed, **(params or {}))
    check_model(model)
    if any(path is not None for path in paths.values()):
        check_data([t for t, p in paths.items() if p is not None], include_path)
        return _evaluate_lmms(model, m, paths, limit, batch_size, seed, out, include_path)
    torch.manual_seed(seed)
    engine = Engine(*load(model))
    accs = {}
    for name in paths:
        t = name.removeprefix(PREFIX)
        res = run_samples(engine, load_split(t, "test", limit), m, batch_size)
        accs[t] = accuracy(res)
        print(f"{t:<10} {accs[t]:.1%}  (n={len(res)}; visual tokens: {res[0].tokens_llm_input} into the LLM, "
              f"{res[0].tokens_layer_avg:.1f} layer average)", file=out)
    print(f"{'macro':<10} {sum(accs.values()) / len(accs):.1%}  method={method} budget={budget:g}", file=out)
    return accs


def _evaluate_lmms(model, method, paths, limit, batch_size, seed, out, include_path) -> dict[str, float]:
    from gripbench.lmms.metrics import pair_limit, rounded_limit_note
    from gripbench.sweep import Runner

    runner = Runner(model, batch_size, tasks=list(paths), include_path=include_path)
    accs = {}
    width = max(len(t) for t in paths)
    for task, path in paths.items():
        task_limit = pair_limit(limit, path)
        if task_limit != limit:
            print(rounded_limit_note(task, limit, task_limit), file=sys.stderr)
        logged, scored = runner.evaluate(task, method, task_limit, seed)
        accs[task] = scored.accuracy
        name, filt = (scored.metric.split(",") + ["none"])[:2]
        print(f"{task:<{width}} {scored.accuracy:.1%}  ({name}{'' if filt == 'none' else f' [{filt}]'} = "
              f"{scored.metric_value:.6g} as lmms-eval reports it; n={len(scored.samples)}, unit: {scored.unit})", file=out)
    print(f"{'macro':<{width}} {sum(accs.values()) / len(accs):.1%}  method={method.name} budget={method.budget:g}", file=out)
    return accs
