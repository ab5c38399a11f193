"""gripbench: which visual-token pruning method is best at which budget, measured honestly."""

__version__ = "0.1.0"
