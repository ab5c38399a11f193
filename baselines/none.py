"""No pruning: the unpruned model, the reference every retention figure divides by."""

from __future__ import annotations

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod


class NoPruning(PruningMethod):
    """keep every visual token (the unpruned reference)"""

    name = "none"

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return []
