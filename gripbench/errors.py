"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import difflib

# How a boolean may be written on a command line or in a config: the one table for all of them.
BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class GripbenchError(Exception):
    """Bad input from the user (a name, a budget, a file). Never a bug in gripbench."""


def unknown(kind: str, name: str, known: list[str]) -> GripbenchError:
    """'unknown method 'fastvv' (did you mean 'fastv'?)' with the closest valid names."""
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
    if close:
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    elif len(known) <= 30:
        hint = f" (known: {', '.join(sorted(known))})"
    else:  # lmms-eval knows ~2,000 tasks: a list that long is no help on one line
        hint = f" ({len(known)} known; list them with `lmms-eval --tasks list`)"
    return GripbenchError(f"unknown {kind} {name!r}{hint}")


def check_budget(rho: float) -> float:
    rho = float(rho)
    if not 0.0 < rho <= 1.0:
        raise GripbenchError(f"budget {rho:g} is outside (0, 1]: it is the fraction of visual tokens kept")
    return rho
