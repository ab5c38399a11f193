"""The pruning interface every method implements, and the entry-point registry.

A method says *where* it acts (`plan`): before the LLM on projector outputs (layer 0),
and/or before chosen LLM layers on hidden states. At each point the engine calls
`select(ctx, point)` with a `PruneContext` whose signals (vision attentions, question
embeddings, hidden states, attention rows) are computed only when the method asks
for them, and the method returns a `Selection`: the visual tokens to keep, as indices
into the image's original visual tokens, and optionally replacement vectors for them
(merging methods put a merged token in the slot of a representative token, so every
token keeps an original position id).

Methods register only through the `gripbench.methods` entry-point group; gripbench's
own baselines are declared in its pyproject.toml exactly as a third party would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import torch

from gripbench.errors import GripbenchError, check_budget, unknown

if TYPE_CHECKING:
    from gripbench.context import PruneContext

ENTRY_POINT_GROUP = "gripbench.methods"


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model before seeing inputs."""

    num_visual_tokens: int
    num_layers: int
    hidden_size: int
    grid: tuple[int, int] | None = None  # visual-token grid (rows, cols) when the image is a single grid


@dataclass(frozen=True)
class PrunePoint:
    """Prune before LLM layer `layer` (0 = on the projector outputs), keeping `keep` visual tokens."""

    layer: int
    keep: int


@dataclass
class Selection:
    """Visual tokens to keep: `keep` [B, k] original visual indices (sorted ascending per row),
    and optionally `replace` [B, k, D]: vectors to use instead of the kept tokens' own."""

    keep: torch.Tensor
    replace: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [B, n] the method's scores, for diagnostics only


def keep_count(budget: float, n: int) -> int:
    """round(rho * N), at least one token."""
    return max(1, min(n, int(math.floor(budget * n + 0.5))))


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, in original order (ties broken by lower index)."""
    n = scores.shape[-1]
    # A tiny index-dependent offset makes ties deterministic across devices and batch sizes.
    order = torch.argsort(scores.double() - torch.arange(n, device=scores.device, dtype=torch.double) * 1e-12,
                          dim=-1, descending=True, stable=True)
    return order[..., :k].sort(dim=-1).values


@dataclass
class PruningMethod:
    """Base class. Subclasses set `name`, document the paper in their module docstring, and
    implement `plan` and `select`. `budget` is rho in (0, 1]; `seed` drives any randomness."""

    budget: float = 1.0
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    name = "base"
    needs_eager_vision = False  # True if the method reads vision-tower attentions

    def __post_init__(self):
        self.budget = check_budget(self.budget)

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        """Where this method prunes and how many visual tokens survive each point."""
        raise NotImplementedError

    def select(self, ctx: PruneContext, point: PrunePoint) -> Selection:
        raise NotImplementedError

    def selection_flops(self, info: ModelInfo, text_tokens: int, arch=None) -> float:
        """FLOPs of the method's own work per sample (scoring, merging), charged to it in
        results. Default: nothing beyond the model's forward."""
        return 0.0

    def describe_params(self) -> dict[str, Any]:
        """The knobs that identify this configuration in results (JSON-serialisable)."""
        return dict(self.params)


@dataclass
class Registry:
    """Methods found through the entry-point group, loaded on first use."""

    entries: dict[str, Any]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def load(self, name: str) -> type[PruningMethod]:
        if name not in self.entries:
            raise unknown("method", name, self.names())
        obj = self.entries[name]
        return obj.load() if hasattr(obj, "load") else obj

    def create(self, name: str, budget: float = 1.0, seed: int = 0, **params) -> PruningMethod:
        cls = self.load(name)
        try:
            return cls(budget=budget, seed=seed, params=params)
        except TypeError as e:
            raise GripbenchError(f"bad parameters for method {name!r}: {e}") from None

    def describe(self) -> dict[str, str]:
        out = {}
        for name in self.names():
            doc = (self.load(name).__doc__ or "").strip().splitlines()
            out[name] = doc[0] if doc else ""
        return out


@lru_cache(maxsize=1)
def _discovered() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def registry() -> Registry:
    """All methods registered under `gripbench.methods` (call `refresh()` after installing one)."""
    return Registry(dict(_discovered()))


def refresh() -> None:
    """Forget the cached entry points (a package was installed or put on sys.path)."""
    _discovered.cache_clear()


def create_method(name: str, budget: float = 1.0, seed: int = 0, **params) -> PruningMethod:
    return registry().create(name, budget=budget, seed=seed, **params)
