"""The sweep: every method x budget x task through lmms-eval, into a store that never loses a cell.

One cell = (model, task, method, method params, budget, limit, seed). For each cell:
1. accuracy: lmms-eval's `simple_evaluate` with the `gripbench` model plugin (one model
   instance for the whole sweep; vision features cached per image and reused by every
   method and budget), per-sample correctness and a bootstrap 95% CI;
2. tokens: the three counts of the budget semantics (README), kept indices per sample, evidence recall;
3. FLOPs: analytic (gripbench/flops.py) with the tokens actually present at each layer,
   plus the method's own selection FLOPs;
4. latency: the latency protocol (README) on a fixed batch (warm-up excluded, repeated timed
   runs, medians and p10/p90 of end to end; vision, selection, prefill, decode timed apart);
5. the cell is written to the store at once (atomic), so a killed sweep resumes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import gripbench
from gripbench import schema
from gripbench.analysis import bootstrap_ci
from gripbench.errors import GripbenchError, check_budget, unknown
from gripbench.flops import cell_flops
from gripbench.lmms import metrics
from gripbench.methods import counted_budget, create_method, parse_method_args, registry
from gripbench.versions import environment_versions

DEFAULT_BUDGETS = (1.0, 0.5, 0.25, 0.125, 0.0625)
LATENCY_BATCH, LATENCY_WARMUP, LATENCY_REPEATS = 8, 2, 5


@dataclass(frozen=True)
class Cell:
    """One experiment (the fields of `schema.KEY`) and what it is computed with (`identity`:
    JSON of `schema.IDENTITY_COLUMNS`, filled by `with_identity`)."""

    model: str
    task: str
    method: str
    budget: float
    limit: int | None
    seed: int
    method_params: str = "{}"
    identity: str = "{}"

    @property
    def key(self) -> tuple:
        return schema.key_of(asdict(self))

    @property
    def config_hash(self) -> str:
        ident = json.dumps({**asdict(self), "identity": json.loads(self.identity), "schema": schema.SCHEMA_VERSION},
                           sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    def record(self) -> dict:
        """The cell's key and identity columns, as written into its row."""
        return {**{k: getattr(self, k) for k in schema.KEY}, **json.loads(self.identity), "config_hash": self.config_hash}


def with_identity(cells: list[Cell], yaml_paths: dict[str, str | None]) -> list[Cell]:
    """The cells with their identity: the method's code, the weights, the task, gripbench's code."""
    from gripbench.provenance import code_identity, model_identity, task_identity

    out, methods, tasks = [], {}, {}
    code = code_identity()
    models = {m: model_identity(m) for m in {c.model for c in cells}}
    for c in cells:
        if c.method not in methods:
            prov = registry().provenance(c.method)
            methods[c.method] = {"method_distribution": prov["distribution"], "method_version": prov["version"],
                                 "method_source_sha256": prov["source_sha256"]}
        if c.task not in tasks:
            tasks[c.task] = task_identity(c.task, yaml_paths.get(c.task))
        ident = {**methods[c.method], "model_sha256": models[c.model], "task_sha256": tasks[c.task], "code_sha256": code}
        out.append(replace(c, identity=json.dumps(ident, sort_keys=True)))
    return out


STALE_REASONS = {"method_source_sha256": "method code ({method})", "method_version": "method version ({method})",
                 "method_distribution": "method distribution ({method})", "model_sha256": "model weights",
                 "task_sha256": "task data or config ({task})", "code_sha256": "gripbench code or package versions"}


@dataclass
class Resume:
    """What a results folder already holds for the planned cells."""

    done: set[str] = field(default_factory=set)  # config hashes finished with the current identity
    stale: dict[str, Cell] = field(default_factory=dict)  # old config hash -> the cell that recomputes it
    replaced: list[str] = field(default_factory=list)  # old hashes whose replacement is already finished
    reasons: dict[str, int] = field(default_factory=dict)  # kind of change -> stale cells


def resume_state(cells: list[Cell], finished: pd.DataFrame) -> Resume:
    """Compare the planned cells with the finished ones by key: same identity -> done; same
    key, other identity -> stale (counted per kind of change: the method's code, the weights,
    the task, gripbench's code; cells written before identities were recorded say so)."""
    state = Resume()
    planned = {c.key: c for c in cells}
    outdated: list[tuple[pd.Series, Cell]] = []
    for _, row in finished.iterrows():
        cell = planned.get(schema.key_of(row))
        if cell is None:
            continue
        if row["config_hash"] == cell.config_hash:
            state.done.add(cell.config_hash)
        else:
            outdated.append((row, cell))
    for row, cell in outdated:
        if cell.config_hash in state.done:
            state.replaced.append(row["config_hash"])
            continue
        state.stale[row["config_hash"]] = cell
        ident = json.loads(cell.identity)
        if any(col not in row or pd.isna(row[col]) for col in schema.IDENTITY_COLUMNS):
            kinds = {"written before cell identity was recorded (schema 1)"}
        else:
            kinds = {STALE_REASONS[col].format(method=cell.method, task=cell.task.removeprefix("gripbench_"))
                     for col in schema.IDENTITY_COLUMNS if row[col] != ident[col]} or {"cell hash rule changed"}
        for k in kinds:
            state.reasons[k] = state.reasons.get(k, 0) + 1
    return state


def resolve_tasks(tasks: str, include_path=None, allow_judge: bool = False) -> dict[str, str | None]:
    """Task names -> {lmms-eval task: its YAML path (None for the embedded tasks)}.

    'all' is the embedded suite; embedded short names map to their lmms-eval names; any other
    name is an lmms-eval task or group (expanded into its tasks) from the stock tasks or the
    `include_path` folders. Unknown names get "did you mean". A task scored by an external LLM
    judge is refused unless `allow_judge` (offline it retries for minutes per answer; online
    its score moves with the judge)."""
    from gripbench.lmms import catalog
    from gripbench.lmms.tasks import task_name
    from gripbench.tasks.suite import TASKS

    names = list(TASKS) if tasks == "all" else _names(tasks, "tasks")
    names = list(dict.fromkeys(task_name(t) if t in TASKS else t for t in names))
    paths = catalog.resolve(names, include_path, embedded=tuple(task_name(t) for t in TASKS), aliases=tuple(TASKS))
    if not allow_judge:
        for task, path in paths.items():
            if marker := metrics.judge_marker(path):
                raise GripbenchError(f"task {task!r} is scored by an external LLM judge ({marker}); "
                                     "pass --allow-judge to run it anyway (needs the judge's API key and network)")
    return paths


def parse_budgets(budgets: str | list[float]) -> list[float]:
    """'1,0.5,0.25' -> [1.0, 0.5, 0.25]: every item a number in (0, 1], duplicates dropped
    (a budget given twice would run its cells twice)."""
    items = budgets.split(",") if isinstance(budgets, str) else list(budgets)
    out: list[float] = []
    for item in items:
        try:
            b = float(str(item).strip())
        except ValueError:
            what = f"{str(item).strip()!r} is not a number" if str(item).strip() else "an empty item"
            raise GripbenchError(f"bad --budgets {budgets!r}: {what} (expected e.g. 1,0.5,0.25)") from None
        b = check_budget(b)
        if b not in out:
            out.append(b)
    if not out:
        raise GripbenchError("--budgets is empty (expected e.g. 1,0.5,0.25)")
    return out


def _names(text: str, what: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise GripbenchError(f"--{what} is empty (give 'all' or a comma-separated list)")
    return names


def plan(model: str, methods: str, tasks: str | dict[str, str | None], budgets: str | list[float], limit: int | None,
         seed: int, method_args: str | dict | None = None, include_path=None) -> list[Cell]:
    """The cells of a sweep. `tasks` is a names string or `resolve_tasks`' output. `method_args`
    ('fastv:K=2,R=0.5;grip:scorer=PATH' or its parsed dict) sets methods' typed parameters;
    each cell records them resolved, defaults included. A task scored over question pairs
    (MME) gets `limit` rounded up to an even number, so its last pair stays whole."""
    known = registry().names()
    names = known if methods == "all" else _names(methods, "methods")
    for m in names:
        if m not in known:
            raise unknown("method", m, known)
    args = parse_method_args(method_args) if isinstance(method_args, str) else dict(method_args or {})
    for m in args:
        if m not in names:
            raise GripbenchError(f"--method-args names {m!r}, which this sweep does not run (methods: {', '.join(names)})")
    bs = parse_budgets(budgets)

    def budgets_of(m: str) -> list[float]:
        return [1.0] if m == "none" else bs  # `none` keeps everything at any budget

    # resolved once per (method, budget), validated by the method itself: unknown or ill-typed -> one line
    params = {(m, b): json.dumps(create_method(m, budget=b, seed=seed, **args.get(m, {})).describe_params(), sort_keys=True)
              for m in names for b in budgets_of(m)}

    cells = []
    task_paths = resolve_tasks(tasks, include_path) if isinstance(tasks, str) else tasks
    for task, path in task_paths.items():
        task_limit = metrics.pair_limit(limit, path)
        for m in names:
            for b in budgets_of(m):
                if b == 1.0 and m != "none" and "none" in names:
                    # At rho = 1 every method keeps every token and answers exactly as `none`
                    # (the contract tests check it against the stock model), so the sweep's
                    # `none` cell is that point of every curve. Those were a fifth of the
                    # default grid's cells and, at full token count, two fifths of its compute.
                    # Without `none` in the sweep (or by running a method alone at
                    # --budgets 1) the cell runs.
                    continue
                cells.append(Cell(model, task, m, b, task_limit, seed, params[m, b]))
    return cells


def check_data(tasks: list[str], include_path=None) -> None:
    """Load each lmms-eval task's dataset once before anything is written: offline, a dataset
    missing from the cache is one line naming it, not a retry traceback mid-sweep (loaded
    datasets are cached by `datasets`, so the sweep's own load is then quick)."""
    from gripbench.lmms.catalog import load_task

    for task in tasks:
        load_task(task, include_path)


def git_commit() -> str | None:
    """The commit of the gripbench checkout, with '+dirty' for uncommitted changes; None outside git."""
    cwd = Path(gripbench.__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=cwd, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def environment(engine) -> dict:
    import lmms_eval
    import transformers

    cfg = engine.model.config
    cpu = f" ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    env = environment_versions()
    return {"device": str(engine.device) + (cpu if engine.device.type == "cpu" else ""),
            "dtype": str(next(engine.model.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": str(cfg.text_config._attn_implementation),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "lmms_eval_version": getattr(lmms_eval, "__version__", None) or env["versions"]["lmms-eval"],
            "gripbench_version": gripbench.__version__, "git_commit": git_commit(), "lock_match": env["lock_match"],
            "torch_threads": torch.get_num_threads()}


def attention_kernel(impl: str, calls: dict) -> str:
    """The attention path of a set of layer calls (`Engine.attention_calls` over the timed
    runs): '<impl>:causal' when every call ran without a mask, ':masked' when none did."""
    causal, total = calls.get("causal", 0), calls.get("causal", 0) + calls.get("masked", 0)
    if total == 0:
        return f"{impl}:none"
    return f"{impl}:" + ("causal" if causal == total else "masked" if causal == 0 else f"mixed ({causal}/{total} causal)")


def cpu_share_since(cpu0: float, wall0: float) -> float:
    """This process's CPU time over (wall time x torch threads) since (cpu0, wall0): about 1
    when the timed runs had their cores to themselves, lower when other processes took
    them. `gripbench check` does not gate latency measured on a busy machine (the ratio to
    `none` itself moves under contention: small pruned kernels wait on shared cores more)."""
    wall = time.perf_counter() - wall0
    return (time.process_time() - cpu0) / (wall * torch.get_num_threads()) if wall > 0 else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    """Start a cell's peak-memory window: CUDA's peak counter, or on Linux the process's
    resident high-water mark (VmHWM, reset by writing 5 to /proc/self/clear_refs), so each
    cell records its own peak rather than the process's lifetime maximum."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> float:
    """Peak bytes since `reset_peak_memory` (GPU memory on CUDA, resident memory on CPU);
    NaN where the platform cannot say."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


class Runner:
    """Runs cells on one loaded model; reusable across cells (one engine, one plugin instance)."""

    def __init__(self, model: str, batch_size: int = 32, verbose: bool = False, tasks: list[str] | None = None,
                 include_path=None):
        from lmms_eval.tasks import TaskManager

        from gripbench.engine import Engine
        from gripbench.lmms import catalog
        from gripbench.lmms.model import GripbenchLMM
        from gripbench.lmms.tasks import PREFIX, materialize
        from gripbench.zoo import load

        self.model_name = model
        self.verbose = verbose
        catalog.quiet_lmms_eval(verbose)  # a sweep shows one progress bar, and lmms-eval's errors
        self.engine = Engine(*load(model))
        self.lm = GripbenchLMM(engine=self.engine, batch_size=batch_size)
        self.lm.capture = LATENCY_BATCH  # the first requests of each task, kept for its latency batch
        self.batch_size = batch_size
        # only the embedded tasks this runner will evaluate are generated (each takes seconds the first time)
        embedded = None if tasks is None else [t.removeprefix(PREFIX) for t in tasks if t.startswith(PREFIX)]
        self.include_path = str(materialize(embedded))
        self.tm = TaskManager(include_path=self.include_path, include_defaults=False)
        self.user_paths = list(catalog.include_paths(include_path))
        # Some stock tasks write side files where lmms-eval's output path points, or into the
        # working directory without one (textvqa: submissions/, ocrbench: results/ocrbench_results.txt,
        # inside the user's results folder): give them a scratch folder of their own.
        self._scratch = tempfile.TemporaryDirectory(prefix="gripbench-lmms-")
        self.cli_args = argparse.Namespace(output_path=self._scratch.name, process_with_media=True)
        self.arch = self.engine.adapter.llm_arch()
        self.env = environment(self.engine)
        # True where other cells may run on the same node while this one is timed (a Ray
        # worker beside others): recorded with the latency, which is then not comparable
        self.concurrent = False

    def task_manager(self, task: str):
        """The embedded tasks' own index when it has the task (no stock indexing), else lmms-eval's
        full index plus the embedded folder and the user's include paths."""
        from lmms_eval.tasks import TaskManager

        from gripbench.lmms import catalog
        from gripbench.lmms.tasks import PREFIX, materialize

        if task in self.tm.all_tasks:
            return self.tm
        if task.startswith(PREFIX):  # an embedded task this runner has not generated yet
            materialize([task.removeprefix(PREFIX)])
            self.tm = TaskManager(include_path=self.include_path, include_defaults=False)
            return self.tm
        return catalog.task_manager([self.include_path, *self.user_paths])

    def evaluate(self, task: str, method, limit: int | None, seed: int) -> tuple[list[dict], metrics.CellMetric]:
        """lmms-eval's `simple_evaluate` of one task with `method`: its logged samples and the
        task's own metric read from them (gripbench/lmms/metrics.py)."""
        from lmms_eval.evaluator import simple_evaluate

        from gripbench.lmms import catalog

        self.lm.set_method(method)
        with contextlib.ExitStack() as quiet:
            if not self.verbose:  # lmms-eval's per-task progress bars write to stderr, some task code prints
                devnull = quiet.enter_context(open(os.devnull, "w"))
                quiet.enter_context(contextlib.redirect_stderr(devnull))
                quiet.enter_context(contextlib.redirect_stdout(devnull))
            with catalog.missing_data(task, self.user_paths):
                out = simple_evaluate(model=self.lm, tasks=[task], limit=limit,
                                      task_manager=self.task_manager(task), log_samples=True, batch_size=self.batch_size,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      verbosity="INFO" if self.verbose else "ERROR", cli_args=self.cli_args)
        if out is None or task not in out.get("samples", {}):
            raise GripbenchError(f"task {task!r}: lmms-eval returned no results")
        logged = out["samples"][task]
        return logged, metrics.read_cell(task, out["configs"][task], out["results"][task], logged)

    def run(self, cell: Cell) -> tuple[dict, pd.DataFrame]:
        method = create_method(cell.method, budget=cell.budget, seed=cell.seed, **json.loads(cell.method_params))
        reset_peak_memory(self.engine.device)
        logged, scored = self.evaluate(cell.task, method, cell.limit, cell.seed)
        records = {r["doc_id"]: r for r in self.lm.records}
        per_doc = scored.samples.set_index("doc_id")
        rows = []
        for s in logged:
            if s["doc_id"] not in per_doc.index:  # e.g. an MME cognition question when the headline is perception
                continue
            rec, doc, sc = records[s["doc_id"]], s["doc"], per_doc.loc[s["doc_id"]]  # the logged doc lacks its image
            evidence = list(doc.get("evidence") or [])
            recall = len(set(evidence) & set(rec["kept_indices"])) / len(evidence) if evidence else np.nan
            pred = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            sample_id = doc.get("sample_id", doc.get("question_id", s["doc_id"]))
            rows.append({"sample_id": str(sample_id) if sample_id is not None else str(s["doc_id"]),
                         "score": float(sc["score"]), "unit": str(sc["unit"]), "stratum": str(sc["stratum"]),
                         "prediction": str(pred), "target": str(s.get("target", "")),
                         "kept_indices": [int(i) for i in rec["kept_indices"]], "evidence_recall": recall,
                         "tokens_llm_input": rec["tokens_llm_input"], "tokens_layer_avg": rec["tokens_layer_avg"],
                         "tokens_kv": rec["tokens_kv"], "prompt_tokens": rec["prompt_tokens"], "new_tokens": rec["new_tokens"]})
        samples = pd.DataFrame(rows)
        if samples["sample_id"].duplicated().any():  # e.g. MME's question_id names the image, shared by a pair
            samples["sample_id"] = [str(s["doc_id"]) for s in logged if s["doc_id"] in per_doc.index]
        lo, hi = bootstrap_ci(samples, cell.seed)
        used = [records[s["doc_id"]] for s in logged if s["doc_id"] in per_doc.index]
        flops, kv_bytes = self.cost(used, method)
        row = {**cell.record(), "n_samples": len(samples), "metric": scored.metric, "metric_value": scored.metric_value,
               "accuracy": scored.accuracy, "score_mean": scored.score_mean, "accuracy_unit": scored.unit,
               "accuracy_ci_low": lo, "accuracy_ci_high": hi,
               "tokens_llm_input": float(samples["tokens_llm_input"].mean()),
               "tokens_layer_avg": float(samples["tokens_layer_avg"].mean()), "tokens_kv": float(samples["tokens_kv"].mean()),
               **budget_met(method, used),
               "evidence_recall": float(samples["evidence_recall"].mean()) if samples["evidence_recall"].notna().any() else np.nan,
               **flops, **self.latency(cell, method), "kv_cache_bytes": kv_bytes,
               "peak_memory_bytes": peak_memory(self.engine.device),
               "batch_size": self.batch_size, **self.env, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return row, samples.drop(columns=["prompt_tokens", "new_tokens", "tokens_llm_input", "tokens_layer_avg", "tokens_kv"])

    def cost(self, records: list[dict], method) -> tuple[dict[str, float], float]:
        """Mean analytic FLOPs and KV-cache bytes per sample, each sample counted with its own
        prompt length, visual tokens per layer and vision work (rows differ in all three on
        dynamic-resolution families)."""
        bytes_per = torch.finfo(next(self.engine.model.parameters()).dtype).bits // 8
        parts, kv = [], []
        for rec in records:
            per_layer, new = rec["visual_per_layer"], max(1, rec["new_tokens"])
            text = rec["prompt_tokens"] - rec["visual_tokens"]
            f = cell_flops(self.arch, text, per_layer, new, method.selection_flops(rec["info"], text, self.arch))
            f["flops_total"] += rec["vision_flops"] - f["flops_vision"]
            f["flops_vision"] = rec["vision_flops"]
            parts.append(f)
            kv.append(sum(2 * (text + v + new) * self.arch.kv_heads * self.arch.head_dim * bytes_per for v in per_layer))
        return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}, float(np.mean(kv))

    def latency(self, cell: Cell, method) -> dict:
        """Warm-up excluded; repeated timed runs on a fixed batch; medians (and p10/p90 end to end).

        The batch is the cell's own task's first requests, as lmms-eval built them (the task's
        prompt template and images, captured by the plugin during the accuracy pass), so a
        task with longer prompts or other image sizes is timed on those. Each timed run of the
        method is paired with a run of `none` on the same batch right after it
        (`latency_none_e2e_ms`): the ratio of the two medians is what `gripbench check` gates.
        Why paired: a ratio against the `none` cell, timed once minutes earlier, moves with
        whatever else the machine does in between (seen in CI: 4-6x under a changing load);
        two runs a few hundred milliseconds apart share that load."""
        images, prompts = zip(*self.lm.inputs[cell.task][:LATENCY_BATCH])
        e = self.engine
        batch = e.prepare(list(images), list(prompts))
        cuda = e.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        unpruned = create_method("none")

        def timed(m) -> dict:
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                vision = e.vision(batch)
            sync()
            t1 = time.perf_counter()
            gen = e.generate(batch, m, max_new_tokens=3, vision=vision)
            sync()
            t2 = time.perf_counter()
            steps = max(1, gen.timings["decode_steps"])
            return {"vision": t1 - t0, "scorer": gen.timings.get("scorer", 0.0), "prefill": gen.timings["prefill"],
                    "decode": gen.timings["decode"] / steps, "e2e": t2 - t0}

        runs, none_e2e, calls = [], [], collections.Counter()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for rep in range(LATENCY_WARMUP + LATENCY_REPEATS):
            before = collections.Counter(e.attention_calls)
            run = timed(method)
            if rep >= LATENCY_WARMUP:  # the method's warm-up runs warm the shared engine for `none` too
                calls.update(e.attention_calls - before)
                runs.append(run)
                none_e2e.append(timed(unpruned)["e2e"] if cell.method != "none" else run["e2e"])
        cpu_share = cpu_share_since(cpu0, wall0) if not cuda else float("nan")
        med = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
        e2e = sorted(r["e2e"] * 1e3 for r in runs)
        return {"latency_vision_ms": med["vision"], "latency_scorer_ms": med["scorer"], "latency_prefill_ms": med["prefill"],
                "latency_decode_ms_per_token": med["decode"], "latency_e2e_ms": med["e2e"],
                "latency_e2e_p10_ms": float(np.percentile(e2e, 10)), "latency_e2e_p90_ms": float(np.percentile(e2e, 90)),
                "latency_none_e2e_ms": statistics.median(none_e2e) * 1e3,
                "latency_ratio_runs": [r["e2e"] / n for r, n in zip(runs, none_e2e)],
                "latency_cpu_share": cpu_share, "latency_batch_size": len(prompts), "latency_concurrent": self.concurrent,
                "attention_kernel": attention_kernel(self.env["attn_implementation"], calls)}


@dataclass
class SweepResult:
    out: Path
    ran: int
    skipped: int
    seconds: float
    cells: list[Cell] = field(default_factory=list)
    stale: int = 0  # cells whose identity changed since they were computed
    kept_stale: int = 0  # of those, reused as they were (--keep-stale)


def budget_met(method, records: list[dict]) -> dict:
    """`budget_reached` (the counted visual tokens / N in the method's accounting, mean over
    samples; fixed tokens such as image newlines left out) and `budget_reachable` (the
    method's own `reachable` on every sample's layout)."""
    reached, reachable = [], True
    for rec in records:
        info, per_layer = rec["info"], rec["visual_per_layer"]
        fixed, n = rec["visual_tokens"] - info.num_visual_tokens, info.num_visual_tokens
        reached.append(counted_budget(method.accounting, [c - fixed for c in per_layer], n) if n else float("nan"))
        reachable &= bool(method.reachable(info))
    return {"budget_reached": float(np.mean(reached)), "budget_reachable": reachable}


def unfit_methods(engine, todo: list[Cell], seed: int, methods: str, method_args) -> dict[str, str]:
    """Methods that cannot run on the loaded model (`PruningMethod.check`), e.g. GRIP with its
    shipped scorer, trained for the embedded model, on a 7B checkpoint. Named explicitly, or
    given --method-args, such a method stops the sweep (one line); under `--methods all` it is
    left out with a note on stderr saying why and how to include it."""
    given = parse_method_args(method_args) if isinstance(method_args, str) else dict(method_args or {})
    unfit = {}
    for m, params in sorted({(c.method, c.method_params) for c in todo}):
        try:
            create_method(m, budget=0.5, seed=seed, **json.loads(params)).check(engine)
        except GripbenchError as e:
            if methods.strip() != "all" or m in given:
                raise
            unfit[m] = str(e)
    for m, why in unfit.items():
        print(f"--methods all: leaving out {m}: {why} (then pass --method-args '{m}:scorer=PATH')", file=sys.stderr)
    return unfit


def run_sweep(model: str = "embedded", methods: str = "all", tasks: str = "all", budgets=DEFAULT_BUDGETS,
              limit: int | None = None, out: str | Path | None = None, seed: int = 0, executor: str = "local",
              batch_size: int = 32, progress: bool = True, verbose: bool = False, keep_stale: bool = False,
              method_args: str | dict | None = None, include_path=None, allow_judge: bool = False,
              cpus_per_cell: int = 1) -> SweepResult:
    """Plan, skip finished cells, run the rest, write each at once. Resumable.

    Everything that can fail on bad input (names, budgets, the model, the folder) is checked
    before anything is written, so a failed command changes nothing on disk. The manifest
    gains one entry per sweep that writes into the folder; the merged files are rebuilt from
    the per-cell files at the end of every command, interrupted or not."""
    from gripbench.store import ResultsStore
    from gripbench.zoo import check_model

    if limit is not None and limit < 1:
        raise GripbenchError("--limit must be at least 1")
    if batch_size < 1:
        raise GripbenchError("--batch-size must be at least 1")
    if executor not in ("local", "ray"):
        raise GripbenchError(f"unknown executor {executor!r} (local or ray)")
    if cpus_per_cell < 1:
        raise GripbenchError("--cpus-per-cell must be at least 1")
    yaml_paths = resolve_tasks(tasks, include_path, allow_judge)
    cells = plan(model, methods, yaml_paths, budgets, limit, seed, method_args)
    check_model(model)
    cells = with_identity(cells, yaml_paths)
    check_data([t for t, path in yaml_paths.items() if path is not None], include_path)
    out = Path(out or Path("results") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    store = ResultsStore(out)
    store.check_writable()
    state = resume_state(cells, store.existing_cells())  # a corrupt or foreign file stops the sweep here, naming it
    kept_stale = sorted(state.stale) if keep_stale else []
    if state.stale:
        for kind, n in sorted(state.reasons.items()):
            print(f"{n} stale cell{'s' if n > 1 else ''}: {kind}" + ("; reused (--keep-stale)" if keep_stale else "; rerun"),
                  file=sys.stderr)
    reused = state.done | {state.stale[h].config_hash for h in kept_stale}
    todo = [c for c in cells if c.config_hash not in reused]
    for task, rounded in sorted({(c.task, c.limit) for c in cells if c.limit != limit}):
        print(metrics.rounded_limit_note(task, limit, rounded), file=sys.stderr)
    runner = (Runner(model, batch_size, verbose, sorted({c.task for c in todo}), include_path)
              if todo and executor == "local" else None)
    if runner is not None:  # e.g. a scorer trained for another model: refused before anything is written
        unfit = unfit_methods(runner.engine, todo, seed, methods, method_args)
        if unfit:
            cells = [c for c in cells if c.method not in unfit]
            todo = [c for c in todo if c.method not in unfit]
    store.create()
    for old in state.replaced:  # replaced by an earlier run that stopped before retiring them
        store.retire(old)
    replaces = {c.config_hash: old for old, c in state.stale.items() if old not in kept_stale}
    run = {"run_id": uuid.uuid4().hex[:12], "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model,
           "methods": methods, "method_args": method_args, "tasks": tasks, "include_path": include_path,
           "budgets": parse_budgets(budgets), "limit": limit, "seed": seed,
           "executor": executor, "cpus_per_cell": cpus_per_cell if executor == "ray" else None, "batch_size": batch_size,
           "cells": len(cells), "cells_to_run": len(todo),
           "stale": state.reasons, "kept_stale": kept_stale, "schema_version": schema.SCHEMA_VERSION,
           "gripbench_version": gripbench.__version__, "git_commit": git_commit(), **environment_versions(),
           "status": "running"}
    start = time.perf_counter()
    ran = 0
    record = bool(todo or kept_stale)  # a run that writes cells, or knowingly reuses stale ones, is recorded
    try:
        if record:
            _record_run(store, run)
        if todo:
            def land(cell: Cell, row: dict, samples: pd.DataFrame) -> None:
                nonlocal ran
                store.add(row, samples)
                if cell.config_hash in replaces:
                    store.retire(replaces[cell.config_hash])
                ran += 1

            if executor == "ray":
                failed = run_on_ray(model, todo, batch_size, land, progress, include_path, cpus_per_cell)
                if failed:
                    raise GripbenchError(f"{len(failed)} of {len(todo)} cells failed (one line each above); the other "
                                         "cells are saved: rerun the same command to retry the failed ones")
            else:
                with _progress(len(todo), progress) as bar:
                    for cell in todo:
                        bar.set_postfix_str(f"{cell.task.removeprefix('gripbench_')} {cell.method} {cell.budget:g}")
                        land(cell, *runner.run(cell))
                        bar.update()
    except BaseException as e:
        run["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        with contextlib.suppress(GripbenchError):  # e.g. the disk is still full: the first error is the one to show
            _close_run(store, run, ran, record)
        raise
    run["status"] = "finished"
    _close_run(store, run, ran, record)
    return SweepResult(out, ran, len(cells) - len(todo), time.perf_counter() - start, cells, len(state.stale), len(kept_stale))


def _close_run(store, run: dict, ran: int, record: bool) -> None:
    """Record how the run ended and rebuild the merged files from the per-cell store."""
    if record:
        run.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), cells_run=ran)
        _record_run(store, run)
    store.consolidate()


def _record_run(store, run: dict) -> None:
    """Add (or update) this sweep's entry in the manifest's `runs`; the latest run's fields
    also stand at the top level, as the report's metadata reads them."""
    manifest = store.manifest()
    if "runs" in manifest:
        runs = [r for r in manifest["runs"] if r.get("run_id") != run["run_id"]]
    else:  # a folder written before runs were recorded: its manifest becomes the first run
        runs = [manifest] if manifest else []
    store.write_manifest({**run, "runs": [*runs, dict(run)]})


def _progress(total: int, enabled: bool):
    """The sweep's one progress bar: cells done, rate, ETA and the current cell."""
    from tqdm import tqdm

    return tqdm(total=total, desc="sweep", unit="cell", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


_RUNNERS: dict[tuple[str, int], Runner] = {}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(error: BaseException) -> str:
    """An error as one plain line: its type and the first line of its message, colour codes
    removed (a Ray task's error arrives as a coloured remote traceback)."""
    text = _ANSI.sub("", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def _node_slots(threads: int) -> int:
    """How many gripbench cells the Ray node running this task can hold at once: one per GPU
    where tasks take GPUs, else its CPUs over the CPUs each cell reserves."""
    import ray

    ctx = ray.get_runtime_context()
    resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == ctx.get_node_id())
    if ctx.get_accelerator_ids().get("GPU"):
        return int(resources.get("GPU", 1))
    return int(resources.get("CPU", threads) // threads)


def _ray_cell(model: str, cell: Cell, batch_size: int, include_path, threads: int) -> dict:
    """Body of one Ray task: run one cell and return it (row and samples) to the driver, which
    alone writes the store, so worker nodes never need to see `--out`. torch runs with the
    `threads` CPUs the task reserved. The cell is flagged `latency_concurrent` when its node
    can hold more than one cell at a time. Errors come back as one line, not a traceback.
    The Runner (model, lmms-eval plugin, vision cache) is kept per worker process and reused."""
    torch.set_num_threads(threads)
    try:
        key = (model, batch_size)
        if key not in _RUNNERS:
            _RUNNERS[key] = Runner(model, batch_size, tasks=[cell.task], include_path=include_path)
            _RUNNERS[key].concurrent = _node_slots(threads) > 1  # a node's resources are fixed: asked once
        runner = _RUNNERS[key]
        row, samples = runner.run(cell)
    except Exception as e:  # noqa: BLE001 - any failure of the cell is reported, the others go on
        return {"error": one_line(e)}
    return {"row": row, "samples": samples}


def run_on_ray(model: str, cells: list[Cell], batch_size: int, land, progress: bool = True, include_path=None,
               cpus_per_cell: int = 1) -> list[tuple[Cell, str]]:
    """One Ray task per cell (`cpus_per_cell` CPUs and torch threads each, and one GPU where
    the cluster has GPUs). Each finished cell comes back to this process, which hands it to
    `land` (the store's writer), as it arrives; a failed cell is one line on stderr and the
    others go on. Connects to a running cluster (`RAY_ADDRESS` or `ray start`) or starts a
    local one. Returns the failed cells with their errors."""
    try:
        import ray
    except ImportError:
        raise GripbenchError("--executor ray needs Ray: pip install 'gripbench[ray]' (or pip install 'ray[default]')") from None
    from tqdm import tqdm

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                                           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
                                           **({"GRIPBENCH_CACHE": os.environ["GRIPBENCH_CACHE"]}
                                              if "GRIPBENCH_CACHE" in os.environ else {})}})
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_gpus=gpus, num_cpus=cpus_per_cell, max_retries=1)(_ray_cell)
    pending = {task.remote(model, c, batch_size, include_path, cpus_per_cell): c for c in cells}
    failed = []
    with tqdm(total=len(pending), desc="cells (ray)", unit="cell", disable=not progress, file=sys.stderr) as bar:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the worker died (e.g. out of memory): its own line
                out = {"error": one_line(e)}
            if "error" in out:
                failed.append((cell, out["error"]))
                bar.write(f"cell failed: {cell.task} {cell.method} budget {cell.budget:g}: {out['error']}", file=sys.stderr)
            else:
                land(cell, out["row"], out["samples"])
            bar.update()
    return failed
