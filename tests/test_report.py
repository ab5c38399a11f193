"""`gripbench report`: one self-contained HTML page, checked in a real headless Chromium;
built from any results folder (no `none`, `none` at 0%, two seeds, one method), and
written atomically or not at all."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_results

from gripbench.cli import main
from gripbench.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("GRIPBENCH_ARTIFACTS", Path(__file__).parent / "artifacts"))
# the flags this machine's closed network needs (see the env notes): no background traffic
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = synthetic_results(tmp_path_factory.mktemp("res") / "res", n=40)
    (folder / "grpo_log.jsonl").write_text("".join(  # a scorer training log beside the results
        f'{{"phase": "grpo", "step": {i}, "reward": {0.5 + i / 100}, "kl": {i / 1000}}}\n' for i in range(1, 21)))
    out = tmp_path_factory.mktemp("rep") / "report.html"
    assert main(["report", str(folder), "-o", str(out)]) == 0
    return out


def test_report_is_self_contained(report):
    text = report.read_text()
    for section in ("Summary", "Pareto frontiers", "Iso-accuracy speedups", "Area under", "Paired significance",
                    "Latency breakdown", "Scorer training", "Token selection", "Run metadata"):
        assert section in text, section
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?https?:""", text)  # nothing fetched
    assert not re.search(r"""<script[^>]+src=""", text)  # plotly.js is inlined, not loaded
    assert text.count("Plotly.newPlot") == 5  # three Pareto plots, latency breakdown, training curves


def test_best_method_is_marked_per_column(report):
    text = report.read_text()
    # at budget 0.25 'good' beats 'weak' on every task: its cells are the marked ones
    row = re.search(r"<tr><td class=l>good</td><td>0.25</td>(.*?)</tr>", text).group(1)
    assert row.count("class=best") == 3  # two tasks and overall
    assert "class=best" not in re.search(r"<tr><td class=l>weak</td><td>0.25</td>(.*?)</tr>", text).group(1)


def test_report_without_images_has_no_gallery(tmp_path):
    def foreign(row, samples):  # a real lmms-eval task: ids that are not embedded samples
        return row, samples.assign(sample_id=[f"doc{i}" for i in range(len(samples))])

    folder = synthetic_results(tmp_path / "pope", tasks=("pope",), edit=foreign, n=30)
    text = build_report(folder)
    assert "Token selection" not in text and "Pareto frontiers" in text


def test_bad_results_folder_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install -y chromium "
                    "(and pip install playwright); .ci/run installs both")
def test_report_renders_in_headless_chromium(report):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    errors, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri(), wait_until="load")
        page.wait_for_function("document.querySelectorAll('.plotly-graph-div svg.main-svg').length >= 5")
        counts = page.evaluate("Array.from(document.querySelectorAll('.plotly-graph-div'))"
                               ".map(d => d.querySelectorAll('svg.main-svg').length)")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert len(counts) == 5 and all(c > 0 for c in counts)
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def _zero_none(row, samples):
    if row["method"] == "none":
        row, samples = {**row, "accuracy": 0.0}, samples.assign(score=0.0)
    return row, samples


def _seed1(row, samples):
    samples = samples.assign(score=samples["score"] * (np.arange(len(samples)) % 4 != 0))
    return {**row, "seed": 1, "config_hash": row["config_hash"] + "-seed1", "accuracy": float(samples["score"].mean())}, samples


FOLDERS = {  # results folders unlike a full sweep: name -> how to make one
    "no none": lambda f: synthetic_results(f, methods=("good", "weak"), n=30),
    "none at 0%": lambda f: synthetic_results(f, edit=_zero_none, n=30),
    "two seeds": lambda f: (synthetic_results(f, n=30), synthetic_results(f, n=30, seed=1, edit=_seed1))[0],
    "one method": lambda f: synthetic_results(f, methods=("good",), n=30),
    "none only": lambda f: synthetic_results(f, methods=("none",), n=30),
}


@pytest.mark.parametrize("kind", FOLDERS)
def test_report_and_check_work_on_any_results_folder(kind, tmp_path, capsys):
    folder = FOLDERS[kind](tmp_path / "res")
    out = tmp_path / "report.html"
    assert main(["report", str(folder), "-o", str(out)]) == 0
    text = out.read_text()
    assert "<h2>Summary</h2>" in text and "<h2>Run metadata</h2>" in text
    assert main(["check", str(folder), "--reference", str(folder)]) == 0
    assert "check passed" in capsys.readouterr().out


def test_retention_against_none_at_zero_accuracy_is_a_dash(tmp_path):
    text = build_report(FOLDERS["none at 0%"](tmp_path / "res"))
    row = re.search(r"<tr><td class=l>good</td><td>0.25</td>(.*?)</tr>", text).group(1)
    assert re.findall(r"<td[^>]*>(.*?)</td>", row)[-1] == "–"  # retention (overall): undefined, not inf
    assert "inf" not in row and "retention is undefined" in text


def test_two_seeds_are_averaged_and_the_page_says_so(tmp_path):
    from gripbench.store import ResultsStore

    folder = FOLDERS["two seeds"](tmp_path / "res")
    text = build_report(folder)
    assert "2 seeds (0, 1)" in text and "mean over its seeds" in text and "within each seed" in text
    cells = ResultsStore(folder).cells()
    both = cells[(cells.method == "weak") & (cells.budget == 0.25)].groupby("task")["accuracy"].mean()
    row = re.search(r"<tr><td class=l>weak</td><td>0.25</td>(.*?)</tr>", text).group(1)
    shown = re.findall(r"<td[^>]*>(.*?)</td>", row)[:2]  # gripbench_counting, gripbench_text
    assert shown == [f"{100 * both['gripbench_counting']:.1f}", f"{100 * both['gripbench_text']:.1f}"]


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder if not os.access(folder, os.W_OK) else Path("/sys")  # root writes anywhere but in sysfs
    folder.chmod(0o755)


@pytest.mark.parametrize("where, message", [("folder", "is a folder"), ("under a file", "a file is in the way"),
                                            ("read-only", "cannot write report")])
def test_unwritable_output_exits_2_with_one_line(tmp_path, read_only_folder, where, message, capsys):
    (tmp_path / "afile").write_text("x")
    out = {"folder": tmp_path, "under a file": tmp_path / "afile" / "report.html",
           "read-only": read_only_folder / "report.html"}[where]
    assert main(["report", str(FOLDERS["one method"](tmp_path / "res")), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_failed_write_leaves_the_previous_report_whole(tmp_path, monkeypatch, capsys):
    folder = FOLDERS["one method"](tmp_path / "res")
    out = tmp_path / "site" / "report.html"
    out.parent.mkdir()
    out.write_text("the previous report")
    written = []

    def disk_full(fd):  # the page reached the temporary file, then the disk filled before it was on disk
        written.append(os.fstat(fd).st_size)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)
        assert main(["report", str(folder), "-o", str(out)]) == 2
    assert written and written[0] > 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "the previous report" and os.listdir(out.parent) == ["report.html"]
    assert main(["report", str(folder), "-o", str(out)]) == 0  # and a write that succeeds replaces it whole
    assert out.read_text().startswith("<!DOCTYPE html>") and out.read_text().endswith("</html>")
    assert os.listdir(out.parent) == ["report.html"] and out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _good_out_of_reach(row, samples):
    """`good` could not meet 0.25 (an in-LLM method on a shallow model): it met 0.4."""
    if row["method"] == "good" and row["budget"] == 0.25:
        row = {**row, "budget_reachable": False, "budget_reached": 0.4}
    elif row["method"] != "none":
        row = {**row, "budget_reachable": True, "budget_reached": row["budget"]}
    return row, samples


def test_unreachable_budget_is_marked_never_best(tmp_path):
    """A cell at a budget the method could not reach is marked †, with what it met, in the
    summary and as an open marker in the plots, and is never the best at that budget (here
    `good` beats `weak` at 0.25, but `weak` is the best method that met it)."""
    from gripbench.report import build_report, summary_html
    from gripbench.store import ResultsStore

    folder = synthetic_results(tmp_path / "res", edit=_good_out_of_reach, n=40)
    cells = ResultsStore(folder).cells()
    table = summary_html(cells)
    good = next(r for r in table.split("<tr>") if r.startswith("<td class=l>good</td><td>0.25 †</td>"))
    weak = next(r for r in table.split("<tr>") if r.startswith("<td class=l>weak</td><td>0.25</td>"))
    assert "class=best" not in good and "class=best" in weak
    page = build_report(folder)
    assert "good at 0.25 (met 0.4)" in page and "circle-open" in page and "out of reach (met 0.4)" in page


def test_report_says_which_cells_were_timed_concurrently(tmp_path):
    """Cells timed beside others on a Ray node are counted in a note; the attention paths of
    the timed runs are listed."""
    res = synthetic_results(tmp_path / "ray", edit=lambda row, samples: (
        {**row, "latency_concurrent": row["method"] == "weak", "attention_kernel": "sdpa:causal"}, samples))
    html_text = build_report(res)
    from gripbench.store import ResultsStore

    cells = ResultsStore(res).cells()
    n, weak = len(cells), int((cells.method == "weak").sum())
    assert f"Latency of {weak} of {n} cells was timed while other cells could run on the same node" in html_text
    assert f"sdpa:causal ({n} cells)" in html_text
    plain = build_report(synthetic_results(tmp_path / "local"))
    assert "timed while other cells" not in plain
