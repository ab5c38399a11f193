"""Every method at chosen budgets on the embedded test sets: macro accuracy and prefill
latency as a ratio to `none` measured in the same run (batch of 32, medians).

Usage: python benchmarks/methods_table.py [--limit 200] [--budgets 0.25,0.0625]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gripbench.engine import Engine
from gripbench.evaluate import accuracy, run_samples
from gripbench.methods import create_method, registry
from gripbench.tasks.suite import TASKS, load_split
from gripbench.zoo import load


def prefill_ms(engine: Engine, batch, method, vision, repeats: int = 7) -> float:
    """Median time of the LLM prefill (selection included), vision features precomputed."""
    times = []
    for rep in range(repeats + 2):
        t0 = time.perf_counter()
        with torch.no_grad():
            cache, _, st, _ = engine.prefill(batch, method, vision)
            engine.adapter.logits(st.hidden[:, -1:])
        if rep >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--budgets", default="0.25,0.0625")
    ap.add_argument("--methods", default="all")
    args = ap.parse_args()
    engine = Engine(*load("embedded"))
    names = registry().names() if args.methods == "all" else args.methods.split(",")
    splits = {t: load_split(t, "test", args.limit) for t in TASKS}
    lat_samples = [s for t in TASKS for s in splits[t][:7]][:32]
    lat_batch = engine.prepare([s.image for s in lat_samples], [s.question for s in lat_samples])
    vision = engine.vision(lat_batch)
    none_ms = prefill_ms(engine, lat_batch, create_method("none"), vision)
    print(f"{'method':<16}{'budget':>7}  " + "  ".join(f"{t[:6]:>6}" for t in TASKS) + "   macro  prefill/none  tok_in  tok_avg")
    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in names:
            m = create_method(name, budget=budget)
            accs, res0 = {}, None
            for t in TASKS:
                res = run_samples(engine, splits[t], m, batch_size=64)
                accs[t] = accuracy(res)
                res0 = res0 or res
            ms = prefill_ms(engine, lat_batch, m, vision)
            macro = sum(accs.values()) / len(accs)
            print(f"{name:<16}{budget:>7g}  " + "  ".join(f"{100 * a:6.1f}" for a in accs.values())
                  + f"  {100 * macro:6.1f}  {ms / none_ms:12.3f}  {res0[0].tokens_llm_input:6d}  {res0[0].tokens_layer_avg:7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
