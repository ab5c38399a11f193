"""`gripbench report`: one self-contained HTML page, checked in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

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
