"""`gripbench report`: one self-contained HTML page from a results folder.

The page embeds plotly.js (no CDN, no MathJax, no web font), so it opens offline and no
request leaves it. Sections: summary table (papers' format), Pareto plots on three cost
axes, iso-accuracy speedups, area under the curve, paired significance, latency
breakdown, token-selection gallery, GRIP training curves, run metadata. Every number
comes from `gripbench.analysis`; this module only lays them out.

Works on any results folder: a subset of methods or tasks, one task, one method, no
`none` or a `none` at 0% accuracy (retention is then undefined and shown as "–"), a real
lmms-eval task (the gallery needs images and evidence, so it appears only for embedded
tasks), several seeds (tables and plots show the mean over seeds of each cell, the
significance tests stay within a seed, and the page says so). The page is written
atomically, so a failed write leaves the previous report whole.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from gripbench import analysis
from gripbench.errors import GripbenchError
from gripbench.store import ResultsStore, atomic_write

AXES = {"flops_total": "FLOPs per sample (total)", "latency_prefill_ms": "prefill latency (ms, batch)",
        "tokens_llm_input": "visual tokens entering the LLM"}
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "svg"}}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} th,td{padding:.25em .6em;text-align:right;border-bottom:1px solid #eee}
th{background:#f6f6f6} td.l,th.l{text-align:left} .best{font-weight:700;background:#e8f4e8}
.note{color:#555;font-size:.9em} .gallery td{text-align:center;vertical-align:top} .gallery img{image-rendering:pixelated}
.sig{color:#b00}
"""


def method_colors(methods: list[str]) -> dict[str, str]:
    """One colour per method, the same in every plot (sorted names -> a fixed palette)."""
    palette = qualitative.D3 + qualitative.Set2
    return {m: ("#000000" if m == "none" else palette[i % len(palette)]) for i, m in enumerate(sorted(methods))}


def _fmt(x, pct=True) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3g}"


def unreachable(cells: pd.DataFrame) -> pd.Series:
    """True for cells whose method could not meet their budget on the model (schema 4's
    `budget_reachable`; an overall row is unreachable when any of its tasks was; folders
    from before schema 4 say nothing, read as reachable)."""
    if "budget_reachable" not in cells:
        return pd.Series(False, index=cells.index)
    flag = pd.to_numeric(cells["budget_reachable"], errors="coerce")
    return flag.notna() & (flag < 1)


def timing_note(cells: pd.DataFrame) -> str:
    """How the latency figures were measured: a warning when some cells were timed while
    other cells could run on the same node (Ray), and the attention paths of the timed runs."""
    out = []
    if "latency_concurrent" in cells:
        shared = pd.to_numeric(cells["latency_concurrent"], errors="coerce").fillna(0).astype(bool)
        if shared.any():
            out.append(f"<p class=note>Latency of {int(shared.sum())} of {len(cells)} cells was timed while other cells "
                       "could run on the same node (Ray executor, `latency_concurrent`): those latencies are measured on "
                       "shared cores and are not comparable with exclusively timed ones; accuracy and FLOPs are unaffected."
                       "</p>")
    if "attention_kernel" in cells and cells["attention_kernel"].notna().any():
        kinds = cells["attention_kernel"].dropna().value_counts()
        out.append("<p class=note>Attention path of the timed runs: "
                   + ", ".join(f"{html.escape(str(k))} ({n} cells)" for k, n in kinds.items()) + ".</p>")
    return "".join(out)


def unreachable_note(cells: pd.DataFrame) -> str:
    """One line per method and budget the method could not meet, with what it met."""
    bad = cells[unreachable(cells)]
    if bad.empty:
        return ""
    met = bad.groupby(["method", "budget"])["budget_reached"].mean()
    items = [f"{html.escape(m)} at {b:g} (met {r:.3g})" for (m, b), r in met.items()]
    return ("<p class=note>† Budget out of the method's reach on this model (an in-LLM method needs full layers before "
            "its first pruning point): the cell holds what the method did at its minimum, not that budget, and is never "
            "marked best at it: " + "; ".join(items) + ".</p>")


def summary_html(cells: pd.DataFrame) -> str:
    """Accuracy (and retention) per method x budget, per task and overall; the best method of
    each column at each budget is marked (ties all marked); `none` is the reference row. A
    budget the method could not reach is marked † and never marked best."""
    out_of_reach = set(map(tuple, cells.loc[unreachable(cells), ["method", "budget"]].drop_duplicates().to_numpy()))
    table = analysis.summary_table(cells)
    tasks = list(table["accuracy"].columns)
    if analysis.OVERALL in tasks:
        tasks = [t for t in tasks if t != analysis.OVERALL] + [analysis.OVERALL]
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = [f"<tr><th class=l>method</th><th>budget</th>{head}<th>retention ({tasks[-1]})</th></tr>"]
    for _, block in table.groupby(level="budget", sort=False):
        others = block.drop(index="none", level="method", errors="ignore")
        others = others.loc[np.array([(m, b) not in out_of_reach for m, b in others.index], dtype=bool)]
        best = {t: others[("accuracy", t)].max() for t in tasks}
        for (method, b), r in block.iterrows():
            tds = []
            far = (method, b) in out_of_reach
            for t in tasks:
                v = r[("accuracy", t)]
                mark = " class=best" if method != "none" and not far and np.isfinite(v) and v == best[t] else ""
                tds.append(f"<td{mark}>{_fmt(v)}</td>")
            rows.append(f"<tr><td class=l>{html.escape(method)}</td><td>{b:g}{' †' if far else ''}</td>{''.join(tds)}"
                        f"<td>{_fmt(r[('retention', tasks[-1])])}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def pareto_figure(cells: pd.DataFrame, cost: str, colors: dict[str, str]) -> go.Figure:
    """Accuracy vs one cost axis: a trace per method (points in budget order, 95% CI error
    bars) and the Pareto frontier as a dashed line; a dropdown picks the task."""
    data = analysis.with_overall(cells)
    tasks = sorted(data["task"].unique(), key=lambda t: (t != analysis.OVERALL, t))
    fig = go.Figure()
    owners = []
    for ti, task in enumerate(tasks):
        g = data[data["task"] == task].dropna(subset=[cost])
        for method, m in g.groupby("method"):
            m = m.sort_values(cost)
            far = unreachable(m).to_numpy()
            asked = [f"{b:g}" + (f" out of reach (met {r:.3g})" if f else "")
                     for b, r, f in zip(m["budget"], m.get("budget_reached", m["budget"]), far)]
            fig.add_trace(go.Scatter(
                x=m[cost], y=100 * m["accuracy"], mode="lines+markers", name=method, legendgroup=method,
                marker={"color": colors[method], "size": 8, "symbol": np.where(far, "circle-open", "circle")},
                line={"color": colors[method]}, visible=ti == 0,
                error_y={"type": "data", "symmetric": False, "array": 100 * (m["accuracy_ci_high"] - m["accuracy"]),
                         "arrayminus": 100 * (m["accuracy"] - m["accuracy_ci_low"]), "thickness": 1},
                customdata=np.stack([asked], axis=-1),
                hovertemplate=f"{method}<br>budget %{{customdata[0]}}<br>%{{x:.3s}}<br>%{{y:.1f}}%<extra></extra>"))
            owners.append(ti)
        front = g[analysis.pareto_frontier(g, cost)].sort_values(cost)
        fig.add_trace(go.Scatter(x=front[cost], y=100 * front["accuracy"], mode="lines", name="Pareto frontier",
                                 line={"color": "#888", "dash": "dash", "width": 3}, visible=ti == 0,
                                 hoverinfo="skip", legendgroup="frontier"))
        owners.append(ti)
    buttons = [{"label": t, "method": "update", "args": [{"visible": [o == ti for o in owners]}, {"title.text": _title(cost, t)}]}
               for ti, t in enumerate(tasks)]
    fig.update_layout(title=_title(cost, tasks[0]), xaxis_title=AXES.get(cost, cost), yaxis_title="accuracy (%)",
                      template="plotly_white", height=460, margin={"t": 70},
                      updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.15}] if len(tasks) > 1 else [])
    if cost == "flops_total":
        fig.update_xaxes(type="log")
    return fig


def _title(cost: str, task: str) -> str:
    return f"accuracy vs {AXES.get(cost, cost).split(' (')[0]} — {task}"


def latency_figure(cells: pd.DataFrame, colors: dict[str, str], budget: float) -> go.Figure:
    """Stacked median latency per method at one budget (mean over tasks): vision, scorer
    (the method's own selection), prefill, decode (per token x generated tokens)."""
    g = cells[(cells["budget"] == budget) | (cells["method"] == "none")]
    parts = {"vision": "latency_vision_ms", "scorer": "latency_scorer_ms", "prefill": "latency_prefill_ms"}
    mean = g.groupby("method")[[*parts.values(), "latency_decode_ms_per_token", "latency_e2e_ms"]].mean()
    decode = (mean["latency_e2e_ms"] - mean[list(parts.values())].sum(axis=1)).clip(lower=0)
    fig = go.Figure()
    for (name, col), color in zip([*parts.items(), ("decode", None)], ["#9ecae1", "#fdae6b", "#3182bd", "#a1d99b"]):
        fig.add_trace(go.Bar(x=mean.index, y=decode if col is None else mean[col], name=name, marker_color=color))
    fig.update_layout(barmode="stack", title=f"latency breakdown at budget {budget:g} (median per batch, mean over tasks)",
                      yaxis_title="ms per batch", template="plotly_white", height=380)
    return fig


def training_figure(logs: dict[str, list[dict]]) -> go.Figure | None:
    """Scorer training curves: every numeric field of each log against its step."""
    fig = go.Figure()
    for name, records in logs.items():
        df = pd.DataFrame(records)
        if "step" not in df:
            continue
        for col in df.columns:
            if col != "step" and pd.api.types.is_numeric_dtype(df[col]) and col not in ("elapsed_s", "lr"):
                fig.add_trace(go.Scatter(x=df["step"], y=df[col], mode="lines", name=f"{name}: {col}"))
    if not fig.data:
        return None
    fig.update_layout(title="scorer training curves", xaxis_title="step", template="plotly_white", height=380)
    return fig


def training_logs(results: Path) -> dict[str, list[dict]]:
    """Scorer training logs (`warmup_log.jsonl`, `grpo_log.jsonl`, `dynamicvit_log.jsonl`, as
    `gripbench train` writes them) beside the results, else those shipped with the scorers."""
    from gripbench.grip.method import WEIGHTS

    paths = sorted(results.glob("*_log.jsonl")) or sorted(Path(WEIGHTS).glob("*_log.jsonl"))
    logs = {}
    for p in paths:
        try:
            logs[p.name.removesuffix("_log.jsonl")] = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError):
            continue
    return logs


def gallery_html(cells: pd.DataFrame, samples: pd.DataFrame, budget: float, per_task: int = 1, scale: int = 3) -> str:
    """Kept tokens of each method at one budget over a few embedded test images (dropped
    patches dimmed, evidence patches outlined in red). Empty for non-embedded tasks."""
    from PIL import Image, ImageDraw

    from gripbench.tasks.suite import make_sample

    chosen = cells[cells["budget"] == budget]
    if chosen.empty or "kept_indices" not in samples:
        return ""
    rows = []
    methods = sorted(chosen["method"].unique())
    for task in sorted(chosen["task"].unique()):
        hashes = dict(zip(chosen.loc[chosen["task"] == task, "method"], chosen.loc[chosen["task"] == task, "config_hash"]))
        ids = samples.loc[samples["config_hash"].isin(hashes.values()), "sample_id"].drop_duplicates().head(per_task)
        for sid in ids:
            try:
                short, split, index = str(sid).rsplit("-", 2)
                sample = make_sample(short, split, int(index))
            except (ValueError, KeyError):
                return ""  # not an embedded task: no image, no evidence
            g, p = sample.scene.config.grid, sample.scene.config.patch_size
            base = sample.image.convert("RGB")
            cellsrow = [f"<td class=l><b>{html.escape(task)}</b><br>{html.escape(sample.question)}<br>answer: {sample.answer}</td>"]
            for method in methods:
                h = hashes.get(method)
                kept = samples.loc[(samples["config_hash"] == h) & (samples["sample_id"] == sid), "kept_indices"]
                if kept.empty:
                    cellsrow.append("<td>–</td>")
                    continue
                keep = set(int(i) for i in kept.iloc[0])
                img = base.copy()
                shade = Image.new("RGBA", img.size, (0, 0, 0, 0))
                draw = ImageDraw.Draw(shade)
                for i in range(g * g):
                    r, c = divmod(i, g)
                    box = (c * p, r * p, (c + 1) * p - 1, (r + 1) * p - 1)
                    if i not in keep:
                        draw.rectangle(box, fill=(255, 255, 255, 190))
                    if i in sample.evidence:
                        draw.rectangle(box, outline=(220, 0, 0, 255))
                img = Image.alpha_composite(img.convert("RGBA"), shade).resize((img.width * scale, img.height * scale), Image.NEAREST)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                recall = len(keep & set(sample.evidence)) / max(1, len(sample.evidence))
                cellsrow.append(f"<td><img src='{uri}' width={img.width} alt='{html.escape(method)}'><br>"
                                f"{len(keep)} kept, evidence {recall:.0%}</td>")
            rows.append("<tr>" + "".join(cellsrow) + "</tr>")
    if not rows:
        return ""
    head = "<tr><th class=l>question</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods) + "</tr>"
    return f"<table class=gallery>{head}{''.join(rows)}</table>"


def frame_html(df: pd.DataFrame, pct: list[str] = (), digits: int = 3) -> str:
    fmt = {c: (lambda v: _fmt(v)) for c in pct}
    return df.to_html(index=False, border=0, formatters=fmt, float_format=lambda v: f"{v:.{digits}g}", na_rep="–",
                      classes="data")


def iso_html(cells: pd.DataFrame) -> str:
    """Minimal cost to reach 95% / 99% of unpruned accuracy (overall), and each method's
    speedup over every other method at that target."""
    data = analysis.with_overall(cells)
    data = data[data["task"] == (analysis.OVERALL if analysis.OVERALL in set(data["task"]) else data["task"].iloc[0])]
    if not analysis.retention(data).notna().any():
        return "<p class=note>Needs the unpruned model's cells (method `none`, accuracy above 0): retention is undefined.</p>"
    parts = []
    for cost in ("flops_total", "latency_prefill_ms"):
        iso = analysis.iso_accuracy(data, cost)
        if iso.empty:
            continue
        sp = analysis.speedups(iso)
        for target, g in iso.groupby("target"):
            s = sp[sp["target"] == target].pivot_table(index="method", columns="other", values="speedup", aggfunc="first")
            t = g.set_index("method")[["cost"]].join(s).reset_index()
            parts.append(f"<h3>{AXES[cost]} at {target:.0%} retention</h3>"
                         "<p class=note>cost: minimal interpolated cost reaching the target (– = not reached at any "
                         "swept budget); other columns: cost of that method / cost of the row's method "
                         "(&gt; 1 = the row is cheaper at equal accuracy).</p>" + frame_html(t))
    return "".join(parts)


def metadata_html(cells: pd.DataFrame, manifest: dict) -> str:
    env_cols = [c for c in ("model", "device", "dtype", "attn_implementation", "torch_version", "transformers_version",
                            "lmms_eval_version", "gripbench_version", "git_commit", "batch_size", "seed") if c in cells]
    env = {c: ", ".join(sorted({str(v) for v in cells[c].dropna()})) for c in env_cols}
    env["samples per cell"] = ", ".join(f"{t}: {n}" for t, n in cells.groupby("task")["n_samples"].max().items())
    if "metric" in cells:  # accuracy is each task's own headline metric, on [0, 1]
        units = cells.get("accuracy_unit", pd.Series("sample", index=cells.index)).fillna("sample")
        env["accuracy = each task's metric"] = ", ".join(
            f"{t}: {m.split(',')[0]}" + (f" ({m.split(',')[1]} filter)" if m.split(",")[1:] not in ([], ["none"]) else "")
            + (f", resampled by {u}" if u != "sample" else "")
            for (t, m, u) in sorted(set(zip(cells["task"], cells["metric"].fillna("exact_match,none"), units))))
    env["cells"] = str(len(cells))
    env["command"] = manifest.get("command", "–")
    rows = "".join(f"<tr><th class=l>{html.escape(k)}</th><td class=l>{html.escape(str(v))}</td></tr>" for k, v in env.items())
    return f"<table>{rows}</table>"


def build_report(results: str | Path, budget: float = 0.25) -> str:
    """The HTML text of the report of a results folder."""
    results = Path(results)
    if not results.is_dir():
        raise GripbenchError(f"results folder {results} does not exist")
    store = ResultsStore(results)
    runs, samples = store.cells(), store.samples()
    if runs.empty:
        raise GripbenchError(f"{results} holds no finished cells")
    cells = analysis.mean_over_seeds(runs)
    seeds = sorted(runs["seed"].unique()) if "n_seeds" in cells else []
    manifest = json.loads((results / "manifest.json").read_text()) if (results / "manifest.json").exists() else {}
    colors = method_colors(list(cells["method"].unique()))
    budgets = sorted(cells.loc[cells["method"] != "none", "budget"].unique())
    focus = min(budgets, key=lambda b: abs(b - budget)) if budgets else 1.0

    pareto = [(cost, pareto_figure(cells, cost, colors)) for cost in AXES if cost in cells and cells[cost].notna().any()]
    sig = analysis.significance(runs, samples)
    sig = sig[sig["budget"] == focus].drop(columns=[c for c in analysis.RUN if c in sig and (c != "seed" or not seeds)])
    auc = analysis.normalized_auc(analysis.with_overall(cells))
    tables = [
        ("Iso-accuracy speedups", iso_html(cells)),
        ("Area under the accuracy-cost curve", "<p class=note>Retention integrated over FLOPs normalised by "
         "the unpruned model's, over the span every method covers (1.0 = no loss at any cost).</p>"
         + (frame_html(auc.pivot_table(index="method", columns="task", values="auc").reset_index()) if not auc.empty else "")),
        (f"Paired significance at budget {focus:g}", "<p class=note>Each method vs the best other method on the same "
         f"samples{', within each seed' if seeds else ''}: accuracy difference and paired p over units (exact "
         "McNemar on right/wrong answers, Wilcoxon signed-rank on soft scores; significant: p &lt; 0.05).</p>"
         + (frame_html(sig.drop(columns=["model", "budget"]), pct=["diff"]) if not sig.empty else "")),
    ]
    others = []
    if {"latency_vision_ms", "latency_prefill_ms", "latency_e2e_ms"} <= set(cells.columns):
        others.append(("Latency breakdown", latency_figure(cells, colors, focus)))
    train_fig = training_figure(training_logs(results))
    if train_fig is not None:
        others.append(("Scorer training", train_fig))
    gallery = gallery_html(runs[runs["seed"] == seeds[0]] if seeds else runs, samples, focus)

    body = [f"<h1>gripbench report: {html.escape(results.name)}</h1>",
            f"<p class=note>{len(runs)} cells, {cells['method'].nunique()} methods, {cells['task'].nunique()} tasks, "
            f"budgets {', '.join(f'{b:g}' for b in sorted(cells['budget'].unique(), reverse=True))}.</p>"]
    if seeds:
        body.append(f"<p class=note>{len(seeds)} seeds ({', '.join(str(s) for s in seeds)}): every table and plot "
                    "shows each (model, task, method, params, budget) cell as the mean over its seeds (accuracy, "
                    "CI bounds, costs); the significance tests pair cells within a seed.</p>")
    body.append(timing_note(runs))
    plotly_js = [True]  # plotly.js is inlined once, in the first figure

    def figure(fig: go.Figure) -> str:
        out = fig.to_html(full_html=False, include_plotlyjs=plotly_js[0], include_mathjax=False, config=PLOT_CONFIG)
        plotly_js[0] = False
        return out

    body.append("<h2>Summary</h2><p class=note>Accuracy (%) per method and budget; best pruning method per column at "
                "each budget in bold green (ties all marked); `none` is the unpruned model.</p>" + summary_html(cells)
                + unreachable_note(cells))
    body.append("<h2>Pareto frontiers</h2><p class=note>Error bars: bootstrap 95% CI. Dashed: the non-dominated "
                "cells. The menu switches task.</p>" + "".join(figure(f) for _, f in pareto))
    body += [f"<h2>{title}</h2>{content}" for title, content in tables]
    body += [f"<h2>{title}</h2>{figure(f)}" for title, f in others]
    if gallery:
        body.append(f"<h2>Token selection at budget {focus:g}</h2><p class=note>Kept patches shown, dropped ones "
                    f"dimmed; red outlines: the question's evidence patches{f' (seed {seeds[0]})' if seeds else ''}.</p>"
                    f"{gallery}")
    body.append(f"<h2>Run metadata</h2>{metadata_html(runs, manifest)}")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>gripbench report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def write_report(results: str | Path, out: str | Path | None = None, budget: float = 0.25) -> Path:
    out = Path(out) if out else Path("reports") / f"{Path(results).name}.html"
    if out.is_dir():
        raise GripbenchError(f"report output {out} is a folder: name the HTML file, e.g. {out / 'report.html'}")
    text = build_report(results, budget)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        reason = "a file is in the way of its folder" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror or e
        raise GripbenchError(f"cannot write report {out}: {reason}") from None
    return out
