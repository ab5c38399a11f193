"""The pruning interface every method implements, and the entry-point registry.

A method says *where* it acts (`plan`): before the LLM on projector outputs (layer 0),
and/or before chosen LLM layers on hidden states. At each point the engine calls
`select(ctx, point)` with a `PruneContext` whose signals (vision attentions, question
embeddings, hidden states, attention rows) are computed only when the method asks
for them, and the method returns a `Selection`: the visual tokens to keep, as indices
into the image's original visual tokens, and optionally replacement vectors for them
(merging methods put a merged token in the slot of a representative token, so every
token keeps an original position id).

A method's knobs are typed dataclass fields of its class (`K: int | None = None`), so a
misspelt or ill-typed parameter is one error line instead of a silently ignored key, and
the resolved values (`describe_params`) identify a result. Its `accounting` says which
token count the budget constrains, so the contract tests (gripbench.testing) can hold it
to that count.

Methods register only through the `gripbench.methods` entry-point group; gripbench's
own baselines are declared in its pyproject.toml exactly as a third party would.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

from gripbench.errors import BOOL_WORDS, GripbenchError, check_budget, unknown

if TYPE_CHECKING:
    from gripbench.context import PruneContext

ENTRY_POINT_GROUP = "gripbench.methods"

# What a method's budget constrains (class attribute `accounting`); the contract checks hold it to it.
ACCOUNTINGS = {
    "llm_input": "visual tokens entering LLM layer 0 = keep_count(rho, N)",
    "layer_avg": "visual tokens averaged over LLM layers = rho * N, within one token per pruning point, where reachable",
    "grid": "each h x w grid pooled to h' x w' tokens, h' = grid_side(rho, h), w' = grid_side(rho, w) (grid_tokens)",
    "none": "keeps every visual token at every budget (the unpruned reference)",
}
_BASE_FIELDS = ("budget", "seed")


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model before seeing inputs."""

    num_visual_tokens: int
    num_layers: int
    hidden_size: int
    grid: tuple[int, int] | None = None  # visual-token grid (rows, cols) when the tokens form one grid
    # every grid the visual tokens form, in order (anyres: base image then the tiles' map; one per image)
    grids: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if self.grid is not None and not self.grids:
            object.__setattr__(self, "grids", (tuple(self.grid),))


@dataclass(frozen=True)
class PrunePoint:
    """Prune before LLM layer `layer` (0 = on the projector outputs), keeping `keep` visual tokens."""

    layer: int
    keep: int


@dataclass
class Selection:
    """Visual tokens to keep: `keep` [B, k] original visual indices, and optionally `replace`
    [B, k, D]: vectors to use instead of the kept tokens' own, row-aligned with `keep`. The
    engine sorts `keep` per row (permuting `replace` alike) and refuses repeats or tokens that
    are no longer present."""

    keep: torch.Tensor
    replace: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # [B, n] the method's scores, for diagnostics only


def round_half_up(x: float) -> int:
    """floor(x + 0.5): the one rounding rule for token counts. Python's round() rounds halves
    to even (round(2.5) == 2, round(3.5) == 4), so methods that used it disagreed by a token
    with keep_count on the same budget."""
    return int(math.floor(x + 0.5))


def keep_count(budget: float, n: int) -> int:
    """round(rho * N) half up, at least one token."""
    return max(1, min(n, round_half_up(budget * n)))


def grid_side(budget: float, grid: int) -> int:
    """The `grid` accounting: a g x g grid pooled to the nearest g' x g' grid to the budget,
    g' = round(g * sqrt(rho)) half up, in [1, g]; g'^2 = round(rho*N) only when rho*N is a square."""
    return max(1, min(grid, round_half_up(grid * math.sqrt(budget))))


def grid_tokens(budget: float, grids) -> int:
    """Tokens the `grid` accounting allows: each rows x cols grid pooled to
    grid_side(rho, rows) x grid_side(rho, cols), summed over the grids (one per image, or the
    base image and the tile map of anyres models)."""
    return sum(grid_side(budget, h) * grid_side(budget, w) for h, w in grids)


def layer_counts(points: list[PrunePoint], info: ModelInfo) -> list[int]:
    """Visual tokens each LLM layer sees under a plan (what the engine records)."""
    at = {p.layer: p.keep for p in points}
    counts, current = [], info.num_visual_tokens
    for layer in range(info.num_layers):
        current = at.get(layer, current)
        counts.append(current)
    return counts


def counted_budget(accounting: str, counts: list[float], n: int) -> float:
    """The visual tokens an accounting counts, as a fraction of N, from the per-LLM-layer
    counts of prunable tokens: those entering layer 0 (`llm_input`, `grid`), their average
    over layers (`layer_avg`), or 1 (`none`, which keeps everything)."""
    if accounting == "none":
        return 1.0
    return (sum(counts) / len(counts) if accounting == "layer_avg" else counts[0]) / n


def lowest_budget(method: PruningMethod, info: ModelInfo) -> float:
    """The smallest budget `method` (with its parameters) can meet on a model: its plan at a
    vanishing budget, counted in its accounting. Below it, `reachable` is False and a sweep
    records what was reached (an in-LLM method keeps every token before its first pruning
    layer, so on a shallow LLM this is far above 1/N)."""
    tiny = dataclasses.replace(method, budget=1e-9)
    return counted_budget(method.accounting, layer_counts(tiny.plan(info), info), info.num_visual_tokens)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, in original order; exact ties go to the lower
    index (a stable descending sort), and unequal scores are never reordered, however small
    (FastV's last-token attention to image tokens is ~1e-11 per token on the embedded model:
    an index-dependent offset of 1e-12, used here before, decided its ranking)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[..., :k].sort(dim=-1).values


# ---- typed parameters ------------------------------------------------------------------------
class _BadValue(Exception):
    """A value that does not fit a declared type (turned into one GripbenchError line)."""


_NONES = ("none", "null", "")
_SCALARS = {int: "an int", float: "a float", bool: "a boolean (true/false/yes/no/1/0)", str: "a string"}


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def type_text(tp) -> str:
    """How a parameter type reads in messages: `int | None`, `'last'|'all'`."""
    if _is_union(tp):
        return " | ".join(type_text(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _expected(tp) -> str:
    if _is_union(tp):
        parts = [_expected(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or none" if type(None) in typing.get_args(tp) else "")
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(repr(a) for a in typing.get_args(tp))
    return _SCALARS[tp]


def _supported(tp) -> bool:
    if _is_union(tp):
        return all(a is type(None) or _supported(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return all(type(a) in _SCALARS for a in typing.get_args(tp))
    return tp in _SCALARS


def _convert(value, tp):
    """`value` as type `tp`; strings (what the CLI passes) are parsed, typed values accepted."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONES)):
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _convert(value, a)
                except _BadValue:
                    pass
        raise _BadValue
    if typing.get_origin(tp) is Literal:
        for option in typing.get_args(tp):
            try:
                if _convert(value, type(option)) == option:
                    return option
            except _BadValue:
                pass
        raise _BadValue
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
            return BOOL_WORDS[value.strip().lower()]
        raise _BadValue
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _BadValue
    if tp is float:
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                pass
        if out is None or not math.isfinite(out):
            raise _BadValue
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _BadValue
    raise _BadValue


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter of a method: its name, type and default."""

    name: str
    type: Any
    default: Any

    def text(self) -> str:
        return f"{self.name}: {type_text(self.type)}"

    def convert(self, value, method: str):
        try:
            return _convert(value, self.type)
        except _BadValue:
            raise GripbenchError(f"parameter {self.name} of {method} must be {_expected(self.type)}, not {value!r}") from None


@cache
def param_specs(cls: type) -> dict[str, ParamSpec]:
    """The parameters `cls` declares: its init dataclass fields except budget and seed."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # an annotation naming something its module does not define
        raise GripbenchError(f"cannot read the parameter types of {cls.__qualname__}: {type(e).__name__}: {e}") from None
    declared = {f.name for f in dataclasses.fields(cls)}
    stray = [n for n, a in vars(cls).get("__annotations__", {}).items() if n not in declared and "ClassVar" not in str(a)]
    if stray:
        raise GripbenchError(f"{cls.__qualname__} declares {', '.join(stray)} with field(...) but is not a dataclass: "
                             "decorate it with @dataclass")
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in _BASE_FIELDS:
            continue
        tp = hints.get(f.name, f.type)
        if not _supported(tp):
            raise GripbenchError(f"parameter {f.name} of {cls.__qualname__} has type {type_text(tp)}; supported: int, float, "
                                 "bool, str, Literal[...] and their Optional")
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = ParamSpec(f.name, tp, default)
    return out


def method_label(method) -> str:
    """The method's registered name, or its class name when it sets none (errors name it)."""
    cls = method if isinstance(method, type) else type(method)
    name = getattr(cls, "name", "base")
    return cls.__name__ if name in (None, "base") else name


def _params_text(cls) -> str:
    specs = param_specs(cls)
    return ", ".join(s.text() for s in specs.values()) if specs else "none besides budget and seed"


@dataclass
class PruningMethod:
    """Base class. Subclasses set `name` and `accounting`, declare their knobs as typed fields
    with defaults (subclasses are made dataclasses automatically; one that uses field(...)
    decorates itself with @dataclass), document the paper in their module docstring, and
    implement `plan` and `select`. `budget` is rho in (0, 1]; `seed` drives any randomness.
    `plan` must be pure (no attributes set): the engine, the FLOPs count and the sweep each
    call it."""

    budget: float = 1.0
    seed: int = 0

    name = "base"
    accounting = "llm_input"  # one of ACCOUNTINGS: which token count the budget constrains
    needs_eager_vision = False  # True if the method reads vision-tower attentions

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.accounting not in ACCOUNTINGS:
            raise TypeError(f"{cls.__qualname__}.accounting = {cls.accounting!r}; expected one of {', '.join(ACCOUNTINGS)}")
        # Typed fields work without @dataclass on the subclass (a class that writes its own
        # __init__ keeps it: dataclass does not replace methods a class defines). A body that
        # uses field(...) is left to its own @dataclass: processing it twice would drop the
        # field() defaults.
        if not any(isinstance(v, dataclasses.Field) for v in vars(cls).values()):
            dataclass(cls)

    def __post_init__(self):
        label = method_label(self)
        try:
            self.budget = check_budget(self.budget)
        except (TypeError, ValueError):
            raise GripbenchError(f"budget of {label} must be a number in (0, 1], not {self.budget!r}") from None
        self.seed = ParamSpec("seed", int, 0).convert(self.seed, label)
        for spec in param_specs(type(self)).values():
            setattr(self, spec.name, spec.convert(getattr(self, spec.name), label))
        self.validate()

    def validate(self) -> None:
        """Range checks that need no model (raise GripbenchError); checks that need the model's
        depth or size belong in `plan`."""

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        """Where this method prunes and how many visual tokens survive each point."""
        raise NotImplementedError

    def select(self, ctx: PruneContext, point: PrunePoint) -> Selection:
        raise NotImplementedError

    def reachable(self, info: ModelInfo) -> bool:
        """False when the budget is below what the method can reach on this model (an in-LLM
        method on a shallow LLM): results then record the reached count, not the asked one."""
        return True

    def check(self, engine) -> None:
        """Refuse, before a sweep runs any cell, a loaded model this method cannot run on (one
        GripbenchError line), e.g. a scorer trained for another model. Default: nothing."""

    def selection_flops(self, info: ModelInfo, text_tokens: int, arch=None) -> float:
        """FLOPs of the method's own work per sample (scoring, merging), charged to it in
        results. Default: nothing beyond the model's forward."""
        return 0.0

    def describe_params(self) -> dict[str, Any]:
        """Every declared parameter with its resolved value (JSON-serialisable): what identifies
        this configuration in results, and what `create_method(name, **it)` rebuilds."""
        return {name: getattr(self, name) for name in param_specs(type(self))}

    @property
    def params(self) -> dict[str, Any]:
        """The parameters as a dict (the old free-form attribute; read-only)."""
        return self.describe_params()


# ---- registry --------------------------------------------------------------------------------
def _dist(ep) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else (None, None)


def _origin(ep) -> str:
    dist, version = _dist(ep)
    value = getattr(ep, "value", None) or f"{ep.__module__}:{ep.__qualname__}"
    return f"{dist or 'an unknown distribution'}{' ' + version if version else ''} ({value})"


def source_files(cls: type) -> list[str]:
    """Source files of `cls` and every PruningMethod class in its MRO, then methods.py."""
    out = []
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, PruningMethod):
            try:
                path = inspect.getsourcefile(klass)
            except TypeError:
                path = None
            out.append(path or f"<no source: {klass.__module__}.{klass.__qualname__}>")
    out.append(__file__)
    return list(dict.fromkeys(out))


def source_sha256(cls: type) -> str:
    """Hash of the bytes of `source_files(cls)` (not their paths, so an installed copy and a
    checkout of the same code agree): the method's code identity."""
    h = hashlib.sha256()
    for path in source_files(cls):
        data = Path(path).read_bytes() if not path.startswith("<") and Path(path).is_file() else path.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass
class Registry:
    """Methods found through the entry-point group, loaded on first use. A name that two
    distributions register is kept in `conflicts` and refused when used, so no plugin can
    silently replace another's method (or a baseline)."""

    entries: dict[str, Any]
    conflicts: dict[str, list[Any]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(set(self.entries) | set(self.conflicts))

    def load(self, name: str) -> type[PruningMethod]:
        if name in self.conflicts:
            origins = " and ".join(sorted(_origin(ep) for ep in self.conflicts[name]))
            raise GripbenchError(f"method {name!r} is registered by more than one distribution: {origins}; uninstall one")
        if name not in self.entries:
            raise unknown("method", name, self.names())
        obj = self.entries[name]
        if hasattr(obj, "load"):
            try:
                cls = obj.load()
            except Exception as e:
                raise GripbenchError(f"entry point {name!r} of {_origin(obj)} failed to load: {type(e).__name__}: {e}") from None
        else:
            cls = obj
        if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
            raise GripbenchError(f"entry point {name!r} of {_origin(obj)} is not a PruningMethod subclass "
                                 f"(it is {type(cls).__name__} {getattr(cls, '__qualname__', cls)!r})")
        return cls

    def create(self, name: str, budget: float = 1.0, seed: int = 0, **params) -> PruningMethod:
        """An instance with `params` checked against the method's declared fields and converted
        to their types (strings from the CLI included)."""
        cls = self.load(name)
        specs = param_specs(cls)
        typed = {}
        for key, value in params.items():
            if key not in specs:
                close = difflib.get_close_matches(key, list(specs), n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise GripbenchError(f"unknown parameter {key!r} for method {name!r}{hint} (parameters: {_params_text(cls)})")
            typed[key] = specs[key].convert(value, name)
        try:
            return cls(budget=budget, seed=seed, **typed)
        except TypeError as e:
            raise GripbenchError(f"bad parameters for method {name!r}: {e}") from None

    def provenance(self, name: str) -> dict[str, str | None]:
        """The method's code identity: {"distribution", "version", "source_sha256"}. The hash
        covers the method's class, its PruningMethod base classes and methods.py, so editing
        the method's code changes it (and makes results recorded with the old code stale)."""
        cls = self.load(name)
        dist, version = _dist(self.entries[name])
        return {"distribution": dist, "version": version, "source_sha256": source_sha256(cls)}

    def describe(self) -> dict[str, str]:
        """First docstring line per method; a method that cannot be loaded shows why, so one
        broken plugin does not hide the others."""
        out = {}
        for name in self.names():
            try:
                doc = (self.load(name).__doc__ or "").strip().splitlines()
                out[name] = doc[0] if doc else ""
            except GripbenchError as e:
                out[name] = f"BROKEN: {e}"
        return out


@lru_cache(maxsize=1)
def _discovered() -> tuple[dict[str, Any], dict[str, list[Any]]]:
    found: dict[str, list[Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    entries, conflicts = {}, {}
    for name, eps in found.items():
        distinct = list({(_dist(ep)[0], ep.value): ep for ep in eps}.values())
        if len(distinct) > 1:
            conflicts[name] = distinct
        else:
            entries[name] = distinct[0]
    return entries, conflicts


def registry() -> Registry:
    """All methods registered under `gripbench.methods` (call `refresh()` after installing one)."""
    entries, conflicts = _discovered()
    return Registry(dict(entries), dict(conflicts))


def refresh() -> None:
    """Forget the cached entry points (a package was installed or put on sys.path)."""
    _discovered.cache_clear()


def create_method(name: str, budget: float = 1.0, seed: int = 0, **params) -> PruningMethod:
    return registry().create(name, budget=budget, seed=seed, **params)


_METHOD_ARGS_EXAMPLE = "expected METHOD:KEY=VALUE[,KEY=VALUE...][;METHOD:...], e.g. 'fastv:K=2,R=0.5;grip:scorer=/x.safetensors'"


def parse_method_args(text: str) -> dict[str, dict[str, str]]:
    """'fastv:K=2,R=0.5;grip:scorer=/x' -> {'fastv': {'K': '2', 'R': '0.5'}, 'grip': {'scorer': '/x'}}.
    Values stay strings: `create_method` converts them to each parameter's declared type."""
    out: dict[str, dict[str, str]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, rest = part.partition(":")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise GripbenchError(f"bad method arguments {part.strip()!r}: {_METHOD_ARGS_EXAMPLE}")
        if name in out:
            raise GripbenchError(f"method arguments name {name!r} twice: {_METHOD_ARGS_EXAMPLE}")
        params: dict[str, str] = {}
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier():
                raise GripbenchError(f"bad method argument {item.strip()!r} for {name!r}: {_METHOD_ARGS_EXAMPLE}")
            if key in params:
                raise GripbenchError(f"method argument {key!r} given twice for {name!r}")
            params[key] = value.strip()
        out[name] = params
    return out
