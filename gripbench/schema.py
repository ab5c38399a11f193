"""The results schema, defined once: the cell key, the cell record and the sample record.

Every module that reads or writes results (the sweep, the store, analysis, the report,
the check) takes its column names from here, and the store validates frames against it
on write and on read (a wrong or missing column is one line naming it). `SCHEMA_VERSION`
is written into every manifest. `python3 -m gripbench.schema` prints the tables below as
Markdown (docs/results-schema.md is that output; a test keeps the two equal).

Version history: 1, the landed layout before cell identity (no identity columns; such
folders still load, and a resume treats their cells as stale, saying why); 2, identity
columns (`gripbench.provenance`), per-run latency ratios, CPU share, per-cell peak memory;
3, each task scored by its own metric (`metric`, `metric_value`, `score_mean`,
`accuracy_unit`; per-sample `score` in [0, 1] with its resampling `unit` and `stratum`, in
place of the boolean `correct`), latency timed per task; 4, `budget_reached` and
`budget_reachable` (a budget an in-LLM method cannot meet on a shallow model is recorded as
such, with what it met); 5, how latency was measured: `torch_threads`, `latency_concurrent`
(timed while other cells could run on the same node: Ray) and `attention_kernel` (the
attention path the timed layers took). Older folders are read through `upgrade` (their samples' `correct`
becomes `score`; their cells were scored by exact match; a cell before 4 says nothing about
reach: both columns null).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from gripbench.errors import GripbenchError

SCHEMA_VERSION = 5


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # str | int | float | bool | list
    unit: str
    doc: str
    required: bool = False  # must be present in every folder this version reads (old ones included)


# What makes two cells the same experiment: compared by resume, check and the analysis.
KEY = ("model", "task", "method", "method_params", "budget", "limit", "seed")
# What the numbers were computed with; a cell whose key matches but identity differs is stale.
IDENTITY_COLUMNS = ("method_distribution", "method_version", "method_source_sha256", "model_sha256", "task_sha256",
                    "code_sha256")

def key_of(row) -> tuple:
    """A cell's key as a hashable tuple, the same for a planned cell and a row read back
    from parquet (numpy scalars, a null limit as NaN or None)."""
    limit = row["limit"]
    limit = None if limit is None or pd.isna(limit) else int(limit)
    return (str(row["model"]), str(row["task"]), str(row["method"]), str(row["method_params"]), float(row["budget"]),
            limit, int(row["seed"]))


CELL = (
    Column("config_hash", "str", "", "hash of the key and the identity columns: the cell's file name", True),
    Column("model", "str", "", "'embedded', a checkpoint folder or a Hugging Face id", True),
    Column("task", "str", "", "lmms-eval task name", True),
    Column("method", "str", "", "registered method name", True),
    Column("method_params", "str", "JSON", "the method's resolved parameters, sorted keys", True),
    Column("budget", "float", "fraction", "rho: share of the image's visual tokens the method may keep", True),
    Column("limit", "int", "samples", "questions per task asked for (null: the whole split)", True),
    Column("seed", "int", "", "seed of the method's randomness, lmms-eval's sampling and the bootstrap", True),
    Column("method_distribution", "str", "", "distribution that registers the method's entry point"),
    Column("method_version", "str", "", "that distribution's version"),
    Column("method_source_sha256", "str", "sha256", "source files of the method's class hierarchy"),
    Column("model_sha256", "str", "", "content hash of the checkpoint files, or hub:<commit>"),
    Column("task_sha256", "str", "", "the task's YAML and Python (its metric), or the embedded generator"),
    Column("code_sha256", "str", "", "gripbench code that runs a cell, and the tracked package versions"),
    Column("n_samples", "int", "samples", "samples evaluated", True),
    Column("metric", "str", "", "lmms-eval results key of the task's headline metric, e.g. 'pope_accuracy,none'"),
    Column("metric_value", "float", "the metric's", "lmms-eval's aggregate of that metric, as it reports it"),
    Column("accuracy", "float", "fraction", "the headline metric on [0, 1] (gripbench/lmms/metrics.py: how it relates to "
           "metric_value)", True),
    Column("score_mean", "float", "fraction", "mean of the per-sample scores (differs from accuracy where the metric is "
           "not a mean, e.g. MME's acc + acc+ over question pairs)"),
    Column("accuracy_unit", "str", "", "what CIs and paired tests resample: 'sample' or 'question pair'"),
    Column("accuracy_ci_low", "float", "fraction", "bootstrap 95% CI over units (within strata), lower bound"),
    Column("accuracy_ci_high", "float", "fraction", "bootstrap 95% CI, upper bound"),
    Column("tokens_llm_input", "float", "tokens", "visual tokens entering LLM layer 0 (mean over samples)"),
    Column("tokens_layer_avg", "float", "tokens", "visual tokens averaged over LLM layers"),
    Column("tokens_kv", "float", "tokens", "visual tokens held in the KV cache, averaged over layers"),
    Column("budget_reached", "float", "fraction", "the budget the cell met in the method's accounting: the visual tokens "
           "it counts / N, mean over samples (llm_input and grid: entering LLM layer 0; layer_avg: the layer average; "
           "none: 1); image-newline tokens, never pruned, are left out of both"),
    Column("budget_reachable", "bool", "", "false when the method cannot meet `budget` on this model (an in-LLM method "
           "on a shallow LLM keeps its minimum instead): the report marks such points and never ranks them at `budget`"),
    Column("evidence_recall", "float", "fraction", "share of the evidence patches kept (embedded tasks; NaN elsewhere)"),
    Column("flops_total", "float", "FLOPs", "per sample: vision + selection + prefill + decode (2 x MACs)"),
    Column("flops_vision", "float", "FLOPs", "vision tower and projector"),
    Column("flops_scorer", "float", "FLOPs", "the method's own selection work"),
    Column("flops_llm_prefill", "float", "FLOPs", "LLM prefill with the tokens present at each layer"),
    Column("flops_decode_per_token", "float", "FLOPs", "one decoding step"),
    Column("latency_vision_ms", "float", "ms", "median over timed runs, whole latency batch (the cell's task's own "
           "prompts and images)"),
    Column("latency_scorer_ms", "float", "ms", "the method's selection, median"),
    Column("latency_prefill_ms", "float", "ms", "LLM prefill without selection, median"),
    Column("latency_decode_ms_per_token", "float", "ms", "median per decoding step"),
    Column("latency_e2e_ms", "float", "ms", "vision to last token, median"),
    Column("latency_e2e_p10_ms", "float", "ms", "10th percentile of end to end"),
    Column("latency_e2e_p90_ms", "float", "ms", "90th percentile of end to end"),
    Column("latency_none_e2e_ms", "float", "ms", "`none` timed on the same batch after each timed run, median"),
    Column("latency_ratio_runs", "list", "ratio", "each timed run's e2e / the paired `none` run's"),
    Column("latency_cpu_share", "float", "fraction", "process CPU time / (wall x torch threads) while timing; NaN on CUDA"),
    Column("latency_batch_size", "int", "samples", "rows of the timed batch"),
    Column("latency_concurrent", "bool", "", "true when other cells could run on the same node while this one was timed "
           "(Ray with more than one task slot per node): its latency is not comparable with exclusively timed cells"),
    Column("attention_kernel", "str", "", "the attention path the timed runs' layers took: '<implementation>:causal' (no "
           "mask: SDPA's causal path, FlashAttention), ':masked' (explicit additive mask) or ':mixed (c/n causal)'"),
    Column("torch_threads", "int", "threads", "torch's intra-op threads in the process that ran the cell"),
    Column("peak_memory_bytes", "float", "bytes", "the cell's own peak: CUDA allocated, or resident memory on CPU"),
    Column("kv_cache_bytes", "float", "bytes", "KV cache of one sample after decoding"),
    Column("batch_size", "int", "samples", "evaluation batch size"),
    Column("device", "str", "", "device (CPU model and torch threads on CPU)"),
    Column("dtype", "str", "", "model dtype"),
    Column("attn_implementation", "str", "", "the LLM's attention implementation"),
    Column("torch_version", "str", "", ""),
    Column("transformers_version", "str", "", ""),
    Column("lmms_eval_version", "str", "", ""),
    Column("gripbench_version", "str", "", ""),
    Column("git_commit", "str", "", "commit of the gripbench checkout, '+dirty' with uncommitted changes"),
    Column("lock_match", "bool", "", "tracked package versions equal gripbench/lock.txt"),
    Column("timestamp", "str", "ISO 8601", "when the cell finished"),
)

SAMPLE = (
    Column("config_hash", "str", "", "the cell", True),
    Column("sample_id", "str", "", "the task's sample id (doc id where it has none)", True),
    Column("score", "float", "fraction", "the task's own per-sample metric (its process_results), in [0, 1]", True),
    Column("unit", "str", "", "resampling unit of CIs and paired tests (the sample, or e.g. MME's question pair)"),
    Column("stratum", "str", "", "stratum of that unit (MME's category; empty elsewhere)"),
    Column("prediction", "str", "", "the model's answer after the task's filters"),
    Column("target", "str", "", "the reference answer"),
    Column("kept_indices", "list", "token index", "visual tokens (0-based in the image) surviving the last pruning step"),
    Column("evidence_recall", "float", "fraction", "share of this sample's evidence patches kept"),
)

_KINDS = {
    "str": lambda s: pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s),
    "int": lambda s: pd.api.types.is_numeric_dtype(s) or s.isna().all(),
    "float": lambda s: pd.api.types.is_numeric_dtype(s) or s.isna().all(),
    "bool": lambda s: pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s) or pd.api.types.is_object_dtype(s),
    "list": lambda s: pd.api.types.is_object_dtype(s),
}


def validate(frame: pd.DataFrame, columns: tuple[Column, ...], where: str, write: bool = False) -> None:
    """One GripbenchError line naming the first missing or ill-typed column. On write every
    column of the current version that is required or an identity column must be present."""
    need = [c for c in columns if c.required or (write and c.name in IDENTITY_COLUMNS)]
    for c in need:
        if c.name not in frame.columns:
            raise GripbenchError(f"{where} is not a gripbench results file of schema {SCHEMA_VERSION} "
                                 f"(missing column {c.name!r}: {c.doc})")
    for c in columns:
        if c.name in frame.columns and len(frame) and not _KINDS[c.kind](frame[c.name]):
            raise GripbenchError(f"{where}: column {c.name!r} should hold {c.kind} values, not {frame[c.name].dtype}")


def upgrade(frame: pd.DataFrame, columns: tuple[Column, ...]) -> pd.DataFrame:
    """A frame written by an older schema, in this version's columns (before validation):
    schema 1-2 samples held a boolean `correct` (exact match), now `score`; their cells were
    scored by that exact match, one sample one unit."""
    if columns is SAMPLE and "score" not in frame and "correct" in frame:
        frame = frame.assign(score=frame["correct"].astype(float), unit=frame["sample_id"].astype(str), stratum="")
    if columns is CELL and "metric" not in frame and "accuracy" in frame:
        frame = frame.assign(metric="exact_match,none", accuracy_unit="sample")
        if pd.api.types.is_numeric_dtype(frame["accuracy"]):  # else validation names the bad column
            frame = frame.assign(metric_value=frame["accuracy"], score_mean=frame["accuracy"])
    return frame


def markdown() -> str:
    """The schema as Markdown tables (docs/results-schema.md)."""
    out = [f"# gripbench results schema, version {SCHEMA_VERSION}", "",
           "Generated by `python3 -m gripbench.schema` from `gripbench/schema.py`, which wins where they differ.", "",
           f"Cell key (one experiment): {', '.join(f'`{k}`' for k in KEY)}. "
           f"Identity (what it was computed with): {', '.join(f'`{k}`' for k in IDENTITY_COLUMNS)}.", ""]
    for title, cols in (("cells.parquet: one row per cell", CELL), ("samples.parquet: one row per sample per cell", SAMPLE)):
        out += [f"## {title}", "", "| column | type | unit | required | meaning |", "|---|---|---|---|---|"]
        out += [f"| `{c.name}` | {c.kind} | {c.unit} | {'yes' if c.required else ''} | {c.doc} |" for c in cols]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
