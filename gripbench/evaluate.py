"""Programmatic evaluation: greedy decoding through the engine, exact match after normalisation.

The full sweep (lmms-eval, results store, FLOPs, latency) builds on `run_samples`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch

from gripbench.errors import GripbenchError, check_budget, unknown

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


def resolve_tasks(tasks: str | list[str]) -> list[str]:
    from gripbench.tasks.suite import TASKS

    names = list(TASKS) if tasks in ("all", ["all"]) else (tasks.split(",") if isinstance(tasks, str) else tasks)
    for t in names:
        if t not in TASKS:
            raise unknown("task", t, list(TASKS))
    return names


def evaluate_tasks(model: str = "embedded", method: str = "none", budget: float = 1.0, tasks="all",
                   limit: int | None = None, batch_size: int = 64, seed: int = 0, out=sys.stdout,
                   params: dict | None = None) -> dict[str, float]:
    """Accuracy per embedded task for one method at one budget; prints a small table."""
    from gripbench.engine import Engine
    from gripbench.methods import create_method
    from gripbench.tasks.suite import load_split
    from gripbench.zoo import load

    budget = check_budget(budget)
    names = resolve_tasks(tasks)
    m = create_method(method, budget=budget, seed=seed, **(params or {}))
    if limit is not None and limit < 1:
        raise GripbenchError("--limit must be at least 1")
    torch.manual_seed(seed)
    engine = Engine(*load(model))
    accs = {}
    for t in names:
        res = run_samples(engine, load_split(t, "test", limit), m, batch_size)
        accs[t] = accuracy(res)
        print(f"{t:<10} {accs[t]:.1%}  (n={len(res)}; visual tokens: {res[0].tokens_llm_input} into the LLM, "
              f"{res[0].tokens_layer_avg:.1f} layer average)", file=out)
    print(f"{'macro':<10} {sum(accs.values()) / len(accs):.1%}  method={method} budget={budget:g}", file=out)
    return accs
