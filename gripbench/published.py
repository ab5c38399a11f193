"""Published results the embedded testbed's rankings are compared with (issue 6/7).

Each table: LLaVA-1.5-7B with 64 of 576 visual tokens kept (rho ~ 0.111), as printed by
its source; numbers were read from the tables themselves (the authors' project-page
images), and every row's average was recomputed from its per-benchmark scores. Sources
disagree on some pairs (FastV vs PDrop, DART vs SparseVLM), which is why there are three.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    source: str
    metric: str
    scores: dict[str, float]  # gripbench method name -> score (higher is better)


LLAVA15_7B_64 = (
    Table("CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967), Table 1; github.com/Theia-4869/CDPruner "
          "gh-pages static/image/llava-1.5-7b.png",
          "relative accuracy over 10 benchmarks (%)",
          {"cdpruner": 97.0, "divprune": 94.7, "visionzip": 94.4, "dart": 92.6, "sparsevlm": 87.1, "fastv": 74.9,
           "pdrop": 72.9}),
    Table("VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818 v2), Table 1; github.com/Theia-4869/VisPruner "
          "gh-pages static/image/llava-1.5-7b.png",
          "relative accuracy over 10 benchmarks (%)",
          {"vispruner": 96.6, "visionzip": 95.6, "sparsevlm": 86.4, "fastv": 75.9}),
    Table("UniPruneBench (arXiv 2511.02650), Table 1 (VLMEvalKit re-runs, 7 benchmarks); "
          "github.com/UniPruneBench-LMM/UniPruneBench-LMM.github.io UniPruneBench/t1.png",
          "mean score over 7 benchmarks",
          {"divprune": 47.0, "vispruner": 46.9, "sparsevlm": 45.6, "dart": 45.4, "random": 42.6, "fastv": 37.5}),
)


def kendall(ours: dict[str, float], table: Table) -> tuple[float, float, int]:
    """(Kendall's tau-b, its p-value, number of methods) between our scores and a published
    table's, on the methods both have; NaN with fewer than three."""
    from scipy.stats import kendalltau

    common = sorted(set(ours) & set(table.scores))
    if len(common) < 3:
        return float("nan"), float("nan"), len(common)
    res = kendalltau([ours[m] for m in common], [table.scores[m] for m in common])
    return float(res.statistic), float(res.pvalue), len(common)
