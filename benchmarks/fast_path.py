"""Prefill latency against FLOPs for pre-LLM methods at one budget, with the engine's causal
fast path (no padding: every layer gets mask=None, SDPA's is_causal kernel) and with the
explicit mask forced, as ratios to `none` measured in the same run.

Usage: python benchmarks/fast_path.py [--budget 0.25] [--batch 8] [--repeats 15]

The batch is eight test questions of one token length (no padding), vision precomputed;
"predicted" is the LLM prefill FLOPs ratio to `none` (analytic, gripbench.flops), so
"realised / predicted" says how much of the FLOPs saving the wall clock sees.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from gripbench.engine import Engine
from gripbench.methods import create_method
from gripbench.tasks.suite import TASKS, load_split
from gripbench.zoo import load

PRE_LLM = ("random", "pool", "attention-score", "visionzip", "divprune", "vispruner", "cdpruner", "grip")


def same_length_batch(engine: Engine, size: int) -> dict:
    by_len = defaultdict(list)
    for task in TASKS:
        for s in load_split(task, "test", 300):
            by_len[len(engine.processor.tokenizer(s.question)["input_ids"])].append(s)
    group = max(by_len.values(), key=len)[:size]
    batch = engine.prepare([s.image for s in group], [s.question for s in group])
    assert batch["attention_mask"].all(), "the batch must have no padding"
    return batch


def flops_ratio(engine: Engine, batch, method) -> float:
    """Analytic LLM prefill FLOPs with `method` / without, for the batch's first row (all rows
    have the same length), plus the method's own selection FLOPs."""
    from gripbench.flops import prefill_macs
    from gripbench.methods import layer_counts

    arch, info = engine.adapter.llm_arch(), engine.info
    text = int(batch["attention_mask"][0].sum()) - info.num_visual_tokens
    full = prefill_macs(arch, [text + info.num_visual_tokens] * info.num_layers)
    kept = prefill_macs(arch, [text + c for c in layer_counts(method.plan(info), info)])
    return (2 * kept + method.selection_flops(info, text, arch)) / (2 * full)


def prefill_ms(engine: Engine, batch, method, vision, repeats: int) -> dict[str, float]:
    """Median prefill time (ms) on each path, the two paths interleaved run by run so that
    drifting machine load hits both alike."""
    cls = type(engine)
    paths = {"fast": cls.causal_kernel, "masked": property(lambda self: False)}
    times = {p: [] for p in paths}
    try:
        with torch.no_grad():
            for rep in range(repeats + 3):
                for name in (list(paths) if rep % 2 else list(paths)[::-1]):
                    cls.causal_kernel = paths[name]
                    t0 = time.perf_counter()
                    engine.prefill(batch, method, vision)
                    if rep >= 3:
                        times[name].append(time.perf_counter() - t0)
    finally:
        cls.causal_kernel = paths["fast"]
    return {p: statistics.median(t) * 1e3 for p, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = Engine(*load("embedded", device="cpu"))
    batch = same_length_batch(engine, args.batch)
    with torch.no_grad():
        vision = engine.vision(batch)
    base = prefill_ms(engine, batch, None, vision, args.repeats)
    print(f"none prefill (batch {args.batch}, {batch['input_ids'].shape[1]} tokens, median of {args.repeats}): "
          f"fast path {base['fast']:.1f} ms, explicit mask {base['masked']:.1f} ms")
    print(f"{'method':<16} {'FLOPs ratio':>11} {'fast: latency ratio':>19} {'realised/predicted':>18} "
          f"{'masked: latency ratio':>21} {'realised/predicted':>18}")
    for name in PRE_LLM:
        method = create_method(name, budget=args.budget)
        ms, flops = prefill_ms(engine, batch, method, vision, args.repeats), flops_ratio(engine, batch, method)
        cells = [(ms[p] / base[p], flops / (ms[p] / base[p])) for p in ("fast", "masked")]
        print(f"{name:<16} {flops:>11.3f} {cells[0][0]:>19.3f} {cells[0][1]:>18.2f} {cells[1][0]:>21.3f} {cells[1][1]:>18.2f}")


if __name__ == "__main__":
    main()
