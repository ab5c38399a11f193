"""Engine overhead at rho = 1 versus the stock `model.generate` (target: ratio <= 1.05).

Both paths run the same batches, interleaved, after warm-up; the figure is the ratio of
medians measured in this one run. Usage: python benchmarks/engine_overhead.py [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gripbench.engine import Engine
from gripbench.methods import create_method
from gripbench.tasks.suite import TASKS, make_sample
from gripbench.zoo import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-new-tokens", type=int, default=3)
    args = ap.parse_args()
    model, proc = load("embedded")
    engine = Engine(model, proc)
    samples = [make_sample(t, "val", i) for i in range(args.batch) for t in TASKS][: args.batch]
    batch = engine.prepare([s.image for s in samples], [s.question for s in samples])
    none = create_method("none")
    stock_t, engine_t = [], []
    with torch.no_grad():
        for rep in range(args.repeats + 3):
            t0 = time.perf_counter()
            ref = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            t1 = time.perf_counter()
            got = engine.generate(batch, none, max_new_tokens=args.max_new_tokens)
            t2 = time.perf_counter()
            if rep >= 3:  # warm-up excluded
                stock_t.append(t1 - t0)
                engine_t.append(t2 - t1)
    n_new = got.tokens.shape[1]
    assert torch.equal(ref[:, batch["input_ids"].shape[1]:][:, :n_new], got.tokens)
    s, e = statistics.median(stock_t), statistics.median(engine_t)
    print(f"batch {args.batch}, {args.repeats} timed runs: stock generate {s * 1e3:.1f} ms, "
          f"engine (none, rho=1) {e * 1e3:.1f} ms, ratio {e / s:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
