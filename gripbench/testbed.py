"""Does the embedded testbed discriminate? The four bars every retrained checkpoint must pass.

1. unpruned: macro accuracy >= 85%, each task >= 70% and >= its blind baseline + 25 points;
2. the image matters: one random visual token gives <= majority + 10 points on every task;
3. the right tokens suffice: the evidence patches plus their neighbours (at most 25% of
   tokens, original position ids) retain >= 95% of unpruned macro accuracy;
4. blind pruning hurts: a random 12.5% of tokens loses >= 15 points of macro accuracy.

Two blind baselines per task: `majority` (always the task's most frequent answer, the
issue's wording) and `prior` (the most frequent answer of each question template,
`suite.prior_baseline`), which is what a model that reads the question but not the image
can reach. They differ where a question narrows its answer set: a spatial question names
its axis ("... horizontally?": left or right, prior ~50%) while the task has four answers
(majority ~27%). Bar 1 uses the larger of the two (the stricter); bar 2 is reported
against both, because one token giving 50% on two-way questions says nothing about the
image leaking.

The evidence oracle reads the generator's ground truth, so it is a diagnostic here and
never a registered pruning method.
"""

from __future__ import annotations

import numpy as np
import torch

from gripbench.evaluate import accuracy, run_samples
from gripbench.methods import PrunePoint, PruningMethod, Selection, create_method
from gripbench.tasks.suite import TASKS, load_split, majority_baseline, prior_baseline


def oracle_keep(evidence: list[int], grid: int, cap: int) -> list[int]:
    """Evidence patches plus their 8-neighbours, at most `cap` tokens: evidence first, then
    the neighbours touching the most evidence patches (ties by index)."""
    ev = set(evidence)
    if len(ev) >= cap:
        return sorted(ev)[:cap]
    touch: dict[int, int] = {}
    for i in ev:
        r, c = divmod(i, grid)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = r + dr, c + dc
                j = rr * grid + cc
                if 0 <= rr < grid and 0 <= cc < grid and j not in ev:
                    touch[j] = touch.get(j, 0) + 1
    extra = sorted(touch, key=lambda j: (-touch[j], j))[: cap - len(ev)]
    return sorted(ev | set(extra))


class EvidenceOracle(PruningMethod):
    """(diagnostic) keep the ground-truth evidence patches and their neighbours, <= rho*N"""

    name = "evidence-oracle"

    def plan(self, info):
        return [PrunePoint(0, int(self.budget * info.num_visual_tokens))]

    def set_batch(self, samples, grid: int, cap: int) -> None:
        self._rows = [oracle_keep(s.evidence, grid, cap) for s in samples]

    def select(self, ctx, point) -> Selection:
        # Rows keep different numbers of tokens, and padding a row with non-evidence tokens
        # would change the condition, so the oracle runs one sample per batch.
        if ctx.batch_size != 1:
            raise ValueError("the evidence oracle runs with batch_size=1")
        return Selection(torch.tensor([self._rows[0]], device=ctx.visual_ids.device))


def measure(engine, limit: int = 300, batch_size: int = 64, log=print) -> dict:
    """Run the four bars on the test split (`limit` questions per task); returns all figures."""
    if engine.info.grid is not None:
        n, grid = engine.info.num_visual_tokens, engine.info.grid[0]
    else:  # dynamic resolution (embedded-qwen): a 96 px scene is 12 x 12 merged tokens of 8 px, the patch grid
        from gripbench.tasks.scenes import SceneConfig

        n, grid = SceneConfig().num_patches, SceneConfig().grid
    cap = int(0.25 * n)
    out: dict = {"tasks": {}}
    oracle = EvidenceOracle(budget=0.25)
    conditions = {
        "unpruned": (create_method("none"), batch_size, None),
        "one_random_token": (create_method("random", budget=1 / n), batch_size, None),
        "random_12.5%": (create_method("random", budget=0.125), batch_size, None),
        "evidence_oracle_25%": (oracle, 1, lambda chunk: oracle.set_batch(chunk, grid, cap)),
    }
    for task in TASKS:
        samples = load_split(task, "test", limit)
        row = {"majority": majority_baseline(samples), "prior": prior_baseline(samples)}
        for name, (method, bs, hook) in conditions.items():
            row[name] = accuracy(run_samples(engine, samples, method, bs, before_batch=hook))
        row["oracle_tokens_mean"] = float(np.mean([len(oracle_keep(s.evidence, grid, cap)) for s in samples]))
        out["tasks"][task] = row
        log(f"{task:<10} " + "  ".join(f"{k} {v:.1%}" if v <= 1 else f"{k} {v:.1f}" for k, v in row.items()))
    macro = {k: float(np.mean([r[k] for r in out["tasks"].values()])) for k in conditions}
    out["macro"] = macro
    bars = {
        "unpruned_macro>=85%": macro["unpruned"] >= 0.85,
        "each_task>=70%_and_blind+25": all(r["unpruned"] >= max(0.70, r["majority"] + 0.25, r["prior"] + 0.25)
                                           for r in out["tasks"].values()),
        "one_token<=majority+10": all(r["one_random_token"] <= r["majority"] + 0.10 for r in out["tasks"].values()),
        "one_token<=prior+10": all(r["one_random_token"] <= r["prior"] + 0.10 for r in out["tasks"].values()),
        "oracle_retains>=95%": macro["evidence_oracle_25%"] >= 0.95 * macro["unpruned"],
        "random12.5%_loses>=15": macro["unpruned"] - macro["random_12.5%"] >= 0.15,
    }
    out["bars"] = bars
    log("macro      " + "  ".join(f"{k} {v:.1%}" for k, v in macro.items()))
    log("bars       " + "  ".join(f"{k}: {'PASS' if ok else 'FAIL'}" for k, ok in bars.items()))
    return out


# The training-free methods compared with published rankings (scorer methods need training).
TRAINING_FREE = ("random", "pool", "attention-score", "fastv", "sparsevlm", "visionzip", "divprune", "pdrop", "dart",
                 "vispruner", "cdpruner")


def evidence_recall(results, samples) -> float:
    """Mean share of each question's evidence patches among the kept tokens."""
    shares = [len(set(r.kept_indices) & set(s.evidence)) / len(s.evidence) for r, s in zip(results, samples) if s.evidence]
    return float(np.mean(shares)) if shares else float("nan")


def diagnostics(engine, limit: int = 100, batch_size: int = 64, methods=TRAINING_FREE, log=print) -> dict:
    """Per training-free method: the evidence recall of what its signal keeps at rho = 0.25,
    and macro accuracy at rho = 0.125 (test split, `limit` questions per task); then Kendall's
    tau between that ranking and each published LLaVA-1.5-7B ranking at 64 tokens
    (`gripbench.published`). Reported as measured: nothing here tunes anything."""
    from gripbench.published import LLAVA15_7B_64, kendall

    splits = {t: load_split(t, "test", limit) for t in TASKS}
    rows = {}
    for name in methods:
        recall, acc = [], []
        for samples in splits.values():
            recall.append(evidence_recall(run_samples(engine, samples, create_method(name, budget=0.25), batch_size), samples))
            acc.append(accuracy(run_samples(engine, samples, create_method(name, budget=0.125), batch_size)))
        reachable = all(create_method(name, budget=b).reachable(engine.info) for b in (0.25, 0.125)) \
            if engine.info.num_visual_tokens else True
        rows[name] = {"evidence_recall_0.25": float(np.mean(recall)), "macro_0.125": float(np.mean(acc)),
                      "reachable": reachable}
        log(f"{name:<16} evidence recall at 0.25 {rows[name]['evidence_recall_0.25']:.3f}   "
            f"macro at 0.125 {rows[name]['macro_0.125']:.1%}{'' if reachable else '  (budget out of reach)'}")
    ours = {m: r["macro_0.125"] for m, r in rows.items()}
    taus = []
    for table in LLAVA15_7B_64:
        tau, p, n = kendall(ours, table)
        taus.append({"source": table.source, "tau": tau, "p": p, "methods": n})
        log(f"Kendall tau vs {table.source.split(',')[0]} ({n} methods): {tau:.2f} (p = {p:.2g})")
    return {"methods": rows, "kendall": taus}
