"""Per model family, on its tiny random checkpoint (gripbench/testing/families): exactness
against the stock model, the engine's overhead at rho = 1 against stock `generate`, analytic
against measured FLOPs, and the method x family matrix (runs; budget honoured per row).

The batch has three rows with images of different sizes and aspect ratios (different
visual-token counts on dynamic-resolution families). Timings are medians of interleaved
runs in this one process; the tiny models make the engine's fixed per-layer Python cost
loom larger than on a real checkpoint, so the ratio is an upper bound of the overhead.

Usage: python benchmarks/families.py [--families qwen2-vl,llava-next] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gripbench import testing
from gripbench.engine import Engine
from gripbench.flops import cell_flops, flop_counter
from gripbench.methods import registry
from gripbench.testing.families import FAMILIES, build, family_images

QUESTIONS = ["what is the color of the circle?", "how many squares are there?", "is there a red triangle?"]
SCORER_METHODS = {"grip", "grip-warmup", "dynamicvit"}


def stock_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def exactness(engine: Engine, batch: dict) -> tuple[float, bool]:
    """(max |logit difference| at real positions, greedy tokens equal) against the stock model."""
    got, mask = engine.logits(batch, None)
    ref = stock_logits(engine.model, batch)
    diff = float((got - ref)[mask].abs().max())
    with torch.no_grad():
        stock = engine.model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    ours = engine.generate(batch, None, max_new_tokens=6).tokens
    n = min(stock.shape[1], ours.shape[1])
    pad = engine.pad_id
    same = all([t for t in a.tolist() if t != pad] == [t for t in b.tolist() if t != pad]
               for a, b in zip(stock[:, :n], ours[:, :n]))
    return diff, same


def overhead(engine: Engine, batch: dict, repeats: int) -> float:
    """Median engine.generate / median stock generate, rho = 1, interleaved after warm-up."""
    stock_t, engine_t = [], []
    with torch.no_grad():
        for rep in range(repeats + 2):
            t0 = time.perf_counter()
            engine.model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
            t1 = time.perf_counter()
            engine.generate(batch, None, max_new_tokens=4)
            t2 = time.perf_counter()
            if rep >= 2:
                stock_t.append(t1 - t0)
                engine_t.append(t2 - t1)
    return statistics.median(engine_t) / statistics.median(stock_t)


def flops_ratio(engine: Engine, batch: dict) -> float:
    """Analytic FLOPs of a whole unpruned generation of row 0 over what torch counted."""
    row = engine.adapter.row_batch(batch, 0)
    with flop_counter() as fc:
        vision = engine.vision(row)
        gen = engine.generate(row, None, max_new_tokens=3, vision=vision)
    per_layer = gen.visual_per_layer[0]
    text = row["input_ids"].shape[1] - per_layer[0]
    new = int((gen.tokens[0] != engine.pad_id).sum())
    f = cell_flops(engine.adapter.llm_arch(), text, per_layer, new)
    total = f["flops_total"] - f["flops_vision"] + engine.adapter.vision_flops(vision[0])
    return total / fc.get_total_flops()


def matrix(engine: Engine, batch: dict, scorer: str) -> dict[str, str]:
    out = {}
    for name in registry().names():
        params = {"scorer": scorer} if name in SCORER_METHODS else {}
        try:
            failures = testing.check_accounting(engine, testing.method_factory(name, **params), batch, budgets=[0.25])
            out[name] = "ok" if not failures else "BUDGET"
        except Exception as e:  # reported, not hidden
            out[name] = f"ERROR {type(e).__name__}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default=",".join(sorted(FAMILIES)))
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import tempfile

    from gripbench.grip.method import save_scorer
    from gripbench.grip.scorer import BudgetAwareScorer

    folder = tempfile.mkdtemp()
    rows, mat = [], {}
    for fam in args.families.split(","):
        engine = Engine(*build(fam))
        images = family_images(fam)[:3]
        batch = engine.prepare(images, QUESTIONS[:len(images)])
        single = engine.adapter.row_batch(batch, 0)
        d1, s1 = exactness(engine, single)
        db, sb = exactness(engine, batch)
        counts = [v.layout.size for v in engine.vision(batch)]
        ratio = overhead(engine, batch, args.repeats)
        fr = flops_ratio(engine, batch)
        torch.manual_seed(0)
        scorer = f"{folder}/{fam}.safetensors"
        save_scorer(BudgetAwareScorer(engine.adapter.hidden_size), scorer)
        mat[fam] = matrix(engine, batch, scorer)
        rows.append((fam, type(engine.model).__name__, counts, d1, s1, db, sb, ratio, fr))
        print(f"{fam}: done", flush=True)
    print(f"\n{'family':18} {'class':40} {'visual tokens/row':18} {'max|dlogit| 1':>13} {'tok=':>4} "
          f"{'max|dlogit| B':>13} {'tok=':>4} {'overhead':>8} {'FLOPs a/m':>9}")
    for fam, cls, counts, d1, s1, db, sb, ratio, fr in rows:
        print(f"{fam:18} {cls:40} {str(counts):18} {d1:13.2e} {'yes' if s1 else 'NO':>4} {db:13.2e} "
              f"{'yes' if sb else 'NO':>4} {ratio:8.3f} {fr:9.4f}")
    names = registry().names()
    print("\nmethod x family at rho = 0.25 (ok = runs and honours its budget on every row)")
    print(f"{'method':16} " + " ".join(f"{f[:12]:>12}" for f in mat))
    for name in names:
        print(f"{name:16} " + " ".join(f"{mat[f][name][:12]:>12}" for f in mat))


if __name__ == "__main__":
    main()
