"""Which lmms-eval tasks exist: the embedded ones, lmms-eval's stock tasks and groups, and the
user's own task YAMLs (`--include-path DIR`, renamed copies of stock tasks included).

One index per set of include paths (indexing lmms-eval's ~2,000 stock YAMLs takes about
3 s, so it is built only when a name is not an embedded task). lmms-eval's own index lets
the first indexed folder win a name clash, stock tasks first; a user's YAML that reuses a
stock task's name would silently run the stock task, so it is refused with one line naming
both files (rename the copy's `task:`).
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from gripbench.errors import GripbenchError


def include_paths(include_path) -> tuple[str, ...]:
    """`--include-path` (one folder or several) as absolute folder paths; a missing one is one line."""
    if not include_path:
        return ()
    items = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    out = []
    for p in items:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise GripbenchError(f"--include-path {p}: no such folder (give a folder of lmms-eval task YAMLs)")
        out.append(str(path.resolve()))
    return tuple(out)


_FOLDERS: dict[str, dict] = {}  # folder -> lmms-eval's index of the YAMLs under it, per process


def _indexer():
    """lmms-eval's TaskManager, indexing each folder once per process: the stock folder
    (~2,000 YAMLs, seconds) is shared by every combination of include paths a command uses."""
    from lmms_eval.tasks import TaskManager

    class CachedIndex(TaskManager):
        def _get_task_and_group(self, task_dir: str):
            key = os.path.abspath(task_dir)
            if key not in _FOLDERS:
                _FOLDERS[key] = super()._get_task_and_group(task_dir)
            return dict(_FOLDERS[key])

    return CachedIndex


def quiet_lmms_eval(verbose: bool = False) -> None:
    """lmms-eval logs every task's set-up at INFO, and every YAML its index cannot load at
    DEBUG, to stdout (its import installs that sink); gripbench shows lmms-eval's errors
    only (`verbose`: its INFO lines too)."""
    global _QUIET
    import lmms_eval.models  # noqa: F401  (installs lmms-eval's sink, which this replaces)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO" if verbose else "ERROR", format="{time:HH:mm:ss} {level} {name}: {message}")
    _QUIET = True


_QUIET = False  # lmms-eval's own sink was replaced (a --verbose sweep's INFO sink is kept)


@lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool):
    if not _QUIET:
        quiet_lmms_eval()
    return _indexer()(verbosity="ERROR", include_path=list(paths) or None, include_defaults=defaults)


def task_manager(include_path=None, defaults: bool = True):
    """lmms-eval's TaskManager over the stock tasks (unless `defaults=False`) and the include paths."""
    return _manager(include_paths(include_path), defaults)


def _clashes(paths: tuple[str, ...]) -> None:
    """A user's YAML named like a stock task would be shadowed by the stock one: refuse."""
    if not paths:
        return
    stock = _manager((), True).task_index
    for name, entry in _manager(paths, False).task_index.items():
        if name in stock and entry.get("type") == "task" and stock[name].get("yaml_path") != entry.get("yaml_path"):
            raise GripbenchError(f"task {name!r} in {entry.get('yaml_path')} has the name of lmms-eval's stock task "
                                 f"({stock[name].get('yaml_path')}), which would run instead: rename it (`task:` in the YAML)")


def resolve(names: list[str], include_path=None, embedded: tuple[str, ...] = (),
            aliases: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Task or group names -> {task: YAML path}, groups and tags expanded into their tasks,
    in order. Embedded tasks (`embedded`, their YAMLs generated on demand) map to None.
    An unknown name gets one line with the closest known names (`aliases` among them: the
    embedded tasks' short names)."""
    out: dict[str, str | None] = {}
    paths = include_paths(include_path)
    others = [n for n in names if n not in embedded]
    tm = task_manager(paths) if others else None
    if tm is not None:
        _clashes(paths)
    for name in names:
        if name in embedded:
            out[name] = None
            continue
        index = tm.task_index
        if name not in index:
            from gripbench.errors import unknown

            raise unknown("task", name, list(aliases) + sorted(index))
        for task in _expand(tm, name):
            path = index.get(task, {}).get("yaml_path")
            out[task] = path if isinstance(path, str) else None
    return out


def _expand(tm, name: str) -> list[str]:
    """A group or tag -> its leaf tasks (recursively); a task -> itself."""
    entry = tm.task_index[name]
    if entry.get("type") == "task":
        return [name]
    if entry.get("type") == "tag":
        members = entry.get("task") or []
    else:
        import yaml as _yaml  # a group's YAML lists its members under `task:`
        from lmms_eval.utils import load_yaml_config

        try:
            cfg = load_yaml_config(entry["yaml_path"], mode="simple")
        except (OSError, _yaml.YAMLError) as e:
            raise GripbenchError(f"group {name!r}: cannot read {entry['yaml_path']} ({e})") from None
        members = [m if isinstance(m, str) else m.get("task") for m in (cfg.get("task") or [])]
    out = []
    for m in members:
        if isinstance(m, str) and m in tm.task_index:
            out += [t for t in _expand(tm, m) if t not in out]
    if not out:
        raise GripbenchError(f"group {name!r} has no tasks gripbench can run")
    return out


def load_task(name: str, include_path=None):
    """The lmms-eval Task object of one task (its dataset loaded): what training reads docs,
    prompts and the per-sample metric from. Offline, missing data is one line naming the dataset."""
    import datasets
    from lmms_eval.tasks import get_task_dict

    datasets.disable_progress_bars()  # one line per split otherwise, on every load
    paths = include_paths(include_path)
    tm = task_manager(paths)
    if name not in tm.task_index:
        from gripbench.errors import unknown

        raise unknown("task", name, sorted(tm.task_index))
    with missing_data(name, paths):
        return get_task_dict([name], tm)[name]


class missing_data:
    """Turns `datasets`' offline failures (a hub dataset not in the local cache; today a
    retry traceback) into one line naming the task and its dataset."""

    def __init__(self, task: str, include_path=None):
        self.task, self.paths = task, include_paths(include_path)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (GripbenchError, KeyboardInterrupt)):
            return False
        text = f"{type(exc).__name__}: {exc}"
        markers = ("offline", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ConnectionError", "LocalEntryNotFound",
                   "Couldn't reach", "couldn't reach", "not find", "doesn't exist on the Hub", "FileNotFoundError",
                   "DatasetNotFoundError", "Max retries")
        chain, e = [text], exc.__cause__ or exc.__context__
        while e is not None and len(chain) < 6:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        if not any(m in c for c in chain for m in markers):
            return False
        dataset = _dataset_of(self.task, self.paths)
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise GripbenchError(f"task {self.task!r}: its data ({dataset}) is not available"
                             + (" offline (not in the Hugging Face cache)" if offline else "")
                             + "; download it once online, or copy the task YAML with dataset_path pointed at local files "
                               "and pass its folder with --include-path") from None


def _dataset_of(task: str, paths: tuple[str, ...]) -> str:
    """The task's `dataset_path` (best effort: the line is shown either way)."""
    try:
        from lmms_eval.utils import load_yaml_config

        entry = task_manager(paths).task_index.get(task) or {}
        if isinstance(entry.get("yaml_path"), str):
            return str(load_yaml_config(entry["yaml_path"], mode="simple").get("dataset_path", "its dataset"))
    except Exception:  # noqa: BLE001
        pass
    return "its dataset"
