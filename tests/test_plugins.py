"""Plugins: a method installed beside gripbench (a distribution on sys.path with an entry
point, as `pip install` leaves it) is registered with its provenance, is held to the same
contract as the baselines through `python3 -m gripbench.testing`, and can neither break
gripbench's own tests (no golden snapshot: skipped) nor shadow or crash the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from gripbench import testing
from gripbench.engine import Engine
from gripbench.errors import GripbenchError
from gripbench.methods import PrunePoint, PruningMethod, Selection, refresh, registry
from gripbench.testing.__main__ import main as contract_main

ROOT = Path(__file__).resolve().parents[1]

PLUGIN_SOURCE = '''
from gripbench.methods import PrunePoint, PruningMethod, Selection, keep_count


class KeepAll(PruningMethod):
    """keeps every visual token whatever the budget (breaks the budget contract)"""

    def plan(self, info):
        return [PrunePoint(0, info.num_visual_tokens)]

    def select(self, ctx, point):
        return Selection(ctx.visual_ids)


class KeepFirst(PruningMethod):
    """keeps the first keep_count(rho, N) visual tokens (a well-behaved plugin)"""

    def plan(self, info):
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def select(self, ctx, point):
        return Selection(ctx.visual_ids[:, : point.keep])


def not_a_method():
    return None
'''


def make_distribution(root: Path, dist: str, version: str, entry_points: dict[str, str]) -> Path:
    """A site folder holding package `<dist with _>` (PLUGIN_SOURCE as its `methods` module) and
    its `.dist-info` (METADATA + entry_points.txt): what `pip install` writes."""
    package = dist.replace("-", "_")
    site = root / dist
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    (site / package / "methods.py").write_text(PLUGIN_SOURCE)
    info = site / f"{package}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {package}.{target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[gripbench.methods]\n{lines}")
    return site


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A well-formed plugin distribution: one method that breaks the contract, one that keeps it."""
    return make_distribution(tmp_path_factory.mktemp("plugins"), "gbtest-plugins", "0.1",
                             {"tmp-keep-all": "methods:KeepAll", "tmp-keep-first": "methods:KeepFirst"})


def installed(monkeypatch, site: Path):
    """Put `site` on sys.path for this test and rediscover the entry points (undone after it)."""
    monkeypatch.syspath_prepend(str(site))
    refresh()


@pytest.fixture(autouse=True)
def _forget_plugins():
    yield
    for mod in [m for m in sys.modules if m.startswith("gbtest_")]:
        del sys.modules[mod]
    refresh()  # monkeypatch restores sys.path after this; the next registry() rediscovers lazily


def _env(site: Path | None = None) -> dict:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


class KeepEverything(PruningMethod):
    """test plugin: keeps every visual token at every budget"""

    def plan(self, info):
        return [PrunePoint(0, info.num_visual_tokens)]

    def select(self, ctx, point):
        return Selection(ctx.visual_ids)


def test_keep_everything_fails_the_shipped_contract(embedded, samples):
    engine = Engine(*embedded)
    batch = testing.contract_batch(engine, samples)
    failures = testing.check_accounting(engine, KeepEverything, batch)
    assert len(failures) == len(testing.BUDGETS) * batch["input_ids"].shape[0]  # one per budget and row
    assert all("144 visual tokens entered the LLM; accounting 'llm_input' needs keep_count" in f for f in failures)
    results = testing.run_checks(engine, KeepEverything, batch)
    assert [r.check for r in results if not r.passed] == ["budget honoured by its accounting"]
    with pytest.raises(AssertionError, match="FAIL  budget honoured by its accounting"):
        testing.assert_contract(results)


def test_installed_plugin_is_registered_with_its_provenance(monkeypatch, plugin_site):
    installed(monkeypatch, plugin_site)
    reg = registry()
    assert {"tmp-keep-all", "tmp-keep-first", "random"} <= set(reg.names())
    prov = reg.provenance("tmp-keep-first")
    assert prov["distribution"] == "gbtest-plugins" and prov["version"] == "0.1"
    assert prov == reg.provenance("tmp-keep-first")  # deterministic
    assert reg.create("tmp-keep-first", budget="0.5").budget == 0.5
    assert registry().provenance("random")["distribution"] == "gripbench"


def test_editing_a_plugin_changes_its_source_hash(monkeypatch, tmp_path):
    site = make_distribution(tmp_path, "gbtest-edit", "0.1", {"tmp-edit": "methods:KeepFirst"})
    installed(monkeypatch, site)
    before = registry().provenance("tmp-edit")["source_sha256"]
    source = site / "gbtest_edit" / "methods.py"
    source.write_text(source.read_text().replace("point.keep]", "point.keep]  # edited"))
    after = registry().provenance("tmp-edit")["source_sha256"]
    assert len(before) == 64 and after != before


def test_shadowing_and_broken_entry_points_are_refused(monkeypatch, tmp_path):
    """A second `random` is an error naming both distributions (not a silent replacement);
    an entry point that is not a PruningMethod subclass, or does not import, is one error line
    when used and a BROKEN line in `describe()`, never a crash of the whole listing."""
    site = make_distribution(tmp_path, "gbtest-broken", "0.2", {
        "random": "methods:KeepFirst", "tmp-not-a-method": "methods:not_a_method", "tmp-missing": "nowhere:Thing"})
    installed(monkeypatch, site)
    reg = registry()
    assert reg.names().count("random") == 1
    for use in (lambda: reg.load("random"), lambda: reg.create("random", budget=0.5)):
        with pytest.raises(GripbenchError) as e:
            use()
        assert str(e.value) == ("method 'random' is registered by more than one distribution: gbtest-broken 0.2 "
                                f"(gbtest_broken.methods:KeepFirst) and gripbench {version('gripbench')} (baselines.random:RandomPruning); "
                                "uninstall one")
    with pytest.raises(GripbenchError, match=r"entry point 'tmp-not-a-method' of gbtest-broken 0\.2 \(gbtest_broken\.methods:"
                                             r"not_a_method\) is not a PruningMethod subclass"):
        reg.load("tmp-not-a-method")
    with pytest.raises(GripbenchError, match=r"entry point 'tmp-missing' of gbtest-broken 0\.2 .* failed to load: ModuleNotFound"):
        reg.load("tmp-missing")
    described = reg.describe()
    assert described["tmp-not-a-method"].startswith("BROKEN: ") and described["random"].startswith("BROKEN: ")
    assert described["fastv"].startswith("drop low-attention image tokens")
    assert all("\n" not in line for line in described.values())


def test_contract_command_passes_a_baseline():
    out = subprocess.run([sys.executable, "-m", "gripbench.testing", "random"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("PASS  ") == 6 and "FAIL" not in out.stdout


def test_contract_command_fails_a_keep_everything_plugin(plugin_site):
    """The one documented command, run against installed plugins: the well-behaved one passes
    every check, the one that keeps every token fails the budget check, exit status 1."""
    out = subprocess.run([sys.executable, "-m", "gripbench.testing", "tmp-keep-first", "tmp-keep-all"], cwd=ROOT,
                         env=_env(plugin_site), capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    first, everything = out.stdout.split("tmp-keep-all on embedded")
    assert first.count("PASS  ") == 6 and "FAIL" not in first
    assert "FAIL  budget honoured by its accounting: rho=0.5 row 0: 144 visual tokens entered the LLM" in everything


def test_contract_command_usage_errors(capsys):
    assert contract_main(["no-such-method"]) == 2
    assert "unknown method 'no-such-method'" in capsys.readouterr().err
    assert contract_main(["fastv:varient=all"]) == 2
    assert "unknown parameter 'varient' for method 'fastv' (did you mean 'variant'?)" in capsys.readouterr().err


def test_plugin_without_golden_does_not_fail_gripbench_tests(plugin_site):
    """gripbench's own golden test, run with a plugin installed beside it: the plugin's
    methods have no snapshot and are skipped with the message; every baseline still passes."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "golden",
                          "tests/test_methods_contract.py"], cwd=ROOT, env=_env(plugin_site),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no golden snapshot for method tmp-keep-first: run pytest --update-golden to create one" in out.stdout
    assert "no golden snapshot for method tmp-keep-all" in out.stdout
    assert " failed" not in out.stdout
