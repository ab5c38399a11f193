"""`gripbench check`: a perturbed results folder fails and names the right cells; a clean
rerun passes; a latency-only slowdown of one method is caught through the ratio to none."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_results

from gripbench.check import Tolerances, compare, failed, load_config, parse_tolerance
from gripbench.cli import main


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return synthetic_results(tmp_path_factory.mktemp("ref") / "ref")


def test_clean_rerun_passes(reference, tmp_path, capsys):
    rerun = synthetic_results(tmp_path / "rerun")
    assert compare(rerun, reference).empty
    assert main(["check", str(rerun), "--reference", str(reference)]) == 0
    assert "passed" in capsys.readouterr().out


def test_degraded_method_fails_and_names_its_cells(reference, tmp_path, capsys):
    def degrade(row, samples):
        if row["method"] == "good" and row["budget"] == 0.25:
            flip = np.arange(len(samples)) % 3 == 0  # a third of the samples turn wrong
            samples = samples.assign(correct=samples["correct"] & ~flip)
            row = {**row, "accuracy": float(samples["correct"].mean())}
        return row, samples

    bad = synthetic_results(tmp_path / "bad", edit=degrade)
    findings = compare(bad, reference)
    reg = findings[findings.verdict == "regressed"]
    assert set(zip(reg.task, reg.method, reg.budget, reg.metric)) == {
        ("gripbench_text", "good", 0.25, "accuracy"), ("gripbench_counting", "good", 0.25, "accuracy")}
    assert main(["check", str(bad), "--reference", str(reference)]) == 1
    out = capsys.readouterr().out
    assert "regressed" in out and "good" in out and "FAILED" in out


def test_small_insignificant_drop_is_not_a_regression(reference, tmp_path):
    def wobble(row, samples):
        if row["method"] == "weak" and row["budget"] == 0.5:
            idx = np.flatnonzero(samples["correct"].to_numpy())[:4]  # 4 of 120 samples: 3.3 points, p = 0.125
            correct = samples["correct"].to_numpy().copy()
            correct[idx] = False
            samples = samples.assign(correct=correct)
            row = {**row, "accuracy": float(correct.mean())}
        return row, samples

    findings = compare(synthetic_results(tmp_path / "w", edit=wobble), reference)
    assert findings.empty  # beyond the 2-point tolerance but not significant


def test_latency_slowdown_of_one_method_is_caught_through_the_ratio(reference, tmp_path):
    def slow(row, samples):
        if row["method"] == "weak":
            row = {**row, "latency_e2e_ms": row["latency_e2e_ms"] * 1.5}
        return row, samples

    findings = compare(synthetic_results(tmp_path / "slow", edit=slow), reference)
    reg = findings[findings.verdict == "regressed"]
    assert set(reg.metric) == {"latency_ratio"} and set(reg.method) == {"weak"} and len(reg) == 6
    assert compare(synthetic_results(tmp_path / "slow2", edit=slow), reference,
                   Tolerances(latency_ratio=0.6)).empty  # within a looser tolerance


def test_load_that_comes_and_goes_during_a_sweep_cancels_in_the_paired_ratio(reference, tmp_path):
    """A method timed while the machine was 4x busier: its own runs and the `none` runs
    interleaved with them slow down together. Against the `none` cell timed earlier (the
    fallback for results without the paired column) the same load reads as a regression."""
    def busy(row, samples):
        if row["method"] == "weak":
            row = {**row, "latency_e2e_ms": row["latency_e2e_ms"] * 4, "latency_none_e2e_ms": row["latency_none_e2e_ms"] * 4}
        return row, samples

    assert compare(synthetic_results(tmp_path / "busy", edit=busy), reference).empty

    def unpaired(edit):
        def apply(row, samples):
            row, samples = edit(row, samples)
            return {k: v for k, v in row.items() if k != "latency_none_e2e_ms"}, samples
        return apply

    old_ref = synthetic_results(tmp_path / "old_ref", edit=unpaired(lambda r, s: (r, s)))
    findings = compare(synthetic_results(tmp_path / "old_busy", edit=unpaired(busy)), old_ref)
    assert set(findings.metric) == {"latency_ratio"} and set(findings.method) == {"weak"}


def test_a_uniformly_slower_machine_is_not_a_regression(reference, tmp_path):
    def machine(row, samples):
        return {**row, **{k: v * 2.0 for k, v in row.items() if k.startswith("latency_")}}, samples

    assert compare(synthetic_results(tmp_path / "m", edit=machine), reference).empty


def test_flops_must_match_exactly(reference, tmp_path):
    def more(row, samples):
        if row["method"] == "good" and row["task"] == "gripbench_text" and row["budget"] == 0.5:
            row = {**row, "flops_total": row["flops_total"] + 1}
        return row, samples

    findings = compare(synthetic_results(tmp_path / "f", edit=more), reference)
    assert list(zip(findings.metric, findings.method, findings.budget, findings.verdict)) == [
        ("flops_total", "good", 0.5, "regressed")]


def test_missing_and_new_cells_are_listed(reference, tmp_path):
    other = synthetic_results(tmp_path / "o", methods=("none", "good", "fresh"))
    findings = compare(other, reference)
    assert set(findings.loc[findings.verdict == "missing", "method"]) == {"weak"}
    assert set(findings.loc[findings.verdict == "new", "method"]) == {"fresh"}
    assert not failed(findings, Tolerances()) and failed(findings, Tolerances(fail_on_missing=True))


def test_tolerances_from_text_and_toml(tmp_path):
    tol = parse_tolerance("acc:-0.05,latency_ratio:+10%")
    assert (tol.acc, tol.latency_ratio) == (0.05, pytest.approx(0.1))
    cfg = tmp_path / "check.toml"
    cfg.write_text('[check]\nacc = -0.03\nlatency_ratio = "+15%"\nalpha = 0.01\n')
    tol = load_config(cfg)
    assert (tol.acc, tol.latency_ratio, tol.alpha) == (0.03, pytest.approx(0.15), 0.01)


@pytest.mark.parametrize("args, message", [
    (["check", "/nonexistent", "--reference", "/nonexistent"], "does not exist"),
    (["check", "{ref}", "--reference", "{ref}", "--tolerance", "speed:3"], "unknown tolerance"),
    (["check", "{ref}", "--reference", "{ref}", "--acc-tol", "lots"], "bad tolerance value"),
])
def test_bad_input_exits_2(reference, args, message, capsys):
    assert main([a.format(ref=reference) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_corrupt_reference_exits_2(reference, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    victim = sorted((broken / "cells.d").glob("*.parquet"))[0]
    victim.write_bytes(b"not parquet")
    assert main(["check", str(reference), "--reference", str(broken)]) == 2
    assert victim.name in capsys.readouterr().err
