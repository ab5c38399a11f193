"""Versions of everything that can change a number, and whether they match the lock.

The lock (`gripbench/lock.txt`, written by `tools/lock.sh`) is the fully resolved
environment the README's commands and CI install against. Packages move under a project
(filelock 4.3 once broke every sweep of a fresh install while older machines passed), so
`gripbench --version` prints, and every results manifest records, the installed versions of
the packages below beside the locked ones.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).parent / "lock.txt"
# Packages whose version can change a result: the model code, evaluation, data loading,
# tokenisation, image decoding and numerics.
TRACKED = ("torch", "transformers", "lmms-eval", "datasets", "tokenizers", "numpy", "pillow")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    """{normalised name: version} of the lock; empty if the lock is not shipped."""
    if not LOCK.exists():
        return {}
    pins = {}
    for line in LOCK.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_norm(name)] = version.strip()
    return pins


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _local(version: str | None) -> str | None:
    """'2.14.1+cu130' -> '2.14.1': a local build tag is not a different release."""
    return version.split("+")[0] if version else version


def environment_versions() -> dict:
    """{"versions": {name: installed}, "locked": {name: locked}, "lock_match": bool,
    "lock_mismatches": [names]} for the tracked packages."""
    pins = locked()
    versions = {n: installed(n) for n in TRACKED}
    lock = {n: pins.get(_norm(n)) for n in TRACKED}
    bad = [n for n in TRACKED if _local(versions[n]) != _local(lock[n])]
    return {"versions": versions, "locked": lock, "lock_match": not bad, "lock_mismatches": bad}


def version_text() -> str:
    """What `gripbench --version` prints: one line per tracked package, then the verdict."""
    import gripbench

    env = environment_versions()
    lines = [f"gripbench {gripbench.__version__}"]
    for n in TRACKED:
        have, want = env["versions"][n] or "not installed", env["locked"][n] or "not locked"
        lines.append(f"  {n:<13} {have:<16} " + ("(= lock)" if n not in env["lock_mismatches"] else f"(lock: {want})"))
    lines.append("environment matches gripbench/lock.txt" if env["lock_match"] else
                 f"environment differs from gripbench/lock.txt ({', '.join(env['lock_mismatches'])}); "
                 "results may not reproduce: pip install -c gripbench/lock.txt -e .")
    return "\n".join(lines)
