"""No pruning: the unpruned model, the reference every retention figure divides by."""

from __future__ import annotations

from gripbench.methods import ModelInfo, PrunePoint, PruningMethod


class NoPruning(PruningMethod):
    """keep every visual token (the unpruned reference)"""

    name = "none"
    accounting = "none"

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return []

    def reachable(self, info: ModelInfo) -> bool:
        """Only rho = 1: `none` keeps every token whatever budget it is given."""
        return self.budget >= 1.0
