"""`gripbench check`: a perturbed results folder fails and names the right cells; a clean
rerun passes; a latency-only slowdown of one method is caught through the ratio to none,
unless the runs overlap (noise) or the machine was busy (unreliable); every tolerance is
validated, so no value silently disables a gate."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_results

from gripbench.check import Tolerances, compare, failed, load_config, parse_tolerance
from gripbench.cli import main
from gripbench.errors import GripbenchError


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
            samples = samples.assign(score=samples["score"] * ~flip)
            row = {**row, "accuracy": float(samples["score"].mean())}
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
            idx = np.flatnonzero(samples["score"].to_numpy())[:4]  # 4 of 120 samples: 3.3 points, p = 0.125
            score = samples["score"].to_numpy().copy()
            score[idx] = 0.0
            samples = samples.assign(score=score)
            row = {**row, "accuracy": float(score.mean())}
        return row, samples

    findings = compare(synthetic_results(tmp_path / "w", edit=wobble), reference)
    assert findings.empty  # beyond the 2-point tolerance but not significant


def slower(factor, runs=None, share=1.0):
    """An edit making `weak` `factor` x slower: its e2e latency and each timed run's paired
    ratio (or, with `runs`, the runs' ratios as these multiples of the cell's ratio), timed
    with `share` of its cores."""
    def edit(row, samples):
        if row["method"] == "weak":
            ratio = row["latency_e2e_ms"] / row["latency_none_e2e_ms"]
            per_run = [ratio * f for f in runs] if runs else [r * factor for r in row["latency_ratio_runs"]]
            row = {**row, "latency_e2e_ms": row["latency_e2e_ms"] * factor, "latency_ratio_runs": per_run,
                   "latency_cpu_share": share}
        return row, samples
    return edit


def test_latency_slowdown_with_every_run_slower_fails(reference, tmp_path, capsys):
    slow = synthetic_results(tmp_path / "slow", edit=slower(1.5))
    findings = compare(slow, reference)
    reg = findings[findings.verdict == "regressed"]
    assert set(reg.metric) == {"latency_ratio"} and set(reg.method) == {"weak"} and len(reg) == len(findings) == 6
    assert reg["result"].to_numpy() == pytest.approx(1.5 * reg["reference"].to_numpy())  # median of the runs
    assert reg["detail"].str.contains("Mann-Whitney p=0.004 on 5 vs 5 runs").all()  # 5 of 5 slower: 1/252
    assert failed(findings, Tolerances())
    assert compare(slow, reference, Tolerances(latency_ratio=0.6)).empty  # within a looser tolerance
    assert main(["check", str(slow), "--reference", str(reference)]) == 1
    out = capsys.readouterr().out
    assert "check FAILED" in out and "median paired ratio to none +25% and Mann-Whitney p < 0.05" in out


@pytest.mark.parametrize("share, share_ref, verdict, detail", [
    (0.5, 1.0, "unreliable", "machine busy: cpu share 0.50 (reference 1.00); latency not gated"),
    (1.0, 0.45, "unreliable", "machine busy: cpu share 1.00 (reference 0.45); latency not gated"),
    (float("nan"), float("nan"), "regressed", "Mann-Whitney"),  # unknown (CUDA) counts as uncontended
])
def test_latency_on_a_busy_machine_is_unreliable_and_passes(reference, tmp_path, share, share_ref, verdict, detail, capsys):
    ref = reference if share_ref == 1.0 else synthetic_results(
        tmp_path / "ref", edit=lambda row, samples: ({**row, "latency_cpu_share": share_ref}, samples))
    new = synthetic_results(tmp_path / "busy", edit=slower(1.5, share=share))
    findings = compare(new, ref)
    assert set(findings.verdict) == {verdict} and set(findings.method) == {"weak"} and len(findings) == 6
    assert findings["detail"].str.contains(detail, regex=False).all()
    assert failed(findings, Tolerances()) == (verdict == "regressed")
    assert main(["check", str(new), "--reference", str(ref)]) == (verdict == "regressed")
    assert verdict in capsys.readouterr().out


def test_latency_change_within_noise_passes(reference, tmp_path):
    """The median ratio grows by 30% (over the 25% tolerance) but the runs overlap the
    reference's: Mann-Whitney p = 0.17, not a regression. Without per-run ratios on one side
    (results written before the column existed) the tolerance alone decides."""
    noisy = synthetic_results(tmp_path / "noisy", edit=slower(1.3, runs=(0.9, 1.0, 1.3, 1.35, 1.6)))
    assert compare(noisy, reference).empty
    assert main(["check", str(noisy), "--reference", str(reference)]) == 0

    old_ref = synthetic_results(tmp_path / "old", edit=lambda row, samples: (
        {k: v for k, v in row.items() if k not in ("latency_ratio_runs", "latency_cpu_share")}, samples))
    findings = compare(noisy, old_ref)
    assert set(findings.verdict) == {"regressed"} and set(findings.method) == {"weak"}
    assert findings["detail"].str.contains("no per-run ratios: tolerance alone").all()


@pytest.mark.parametrize("how", [["--latency-gate", "warn"], ["--tolerance", "latency_gate:warn"], ["--config", "{toml}"]])
def test_latency_gate_warn_reports_slower_and_passes(reference, tmp_path, how, capsys):
    slow = synthetic_results(tmp_path / "slow", edit=slower(1.5))
    findings = compare(slow, reference, Tolerances(latency_gate="warn"))
    assert set(findings.verdict) == {"slower"} and len(findings) == 6 and not failed(findings, Tolerances())
    toml = tmp_path / "check.toml"
    toml.write_text('[check]\nlatency_gate = "warn"\n')
    assert main(["check", str(slow), "--reference", str(reference), *[a.format(toml=toml) for a in how]]) == 0
    out = capsys.readouterr().out
    assert "slower" in out and "check passed" in out and "a slower cell only warns (latency_gate warn)" in out


def test_two_seeds_in_one_folder_pass_against_themselves(tmp_path, capsys):
    def seed1(row, samples):  # other per-sample draws, and `weak` (a random method, say) a third worse
        if row["method"] == "weak":
            samples = samples.assign(score=samples["score"] * (np.arange(len(samples)) % 3 != 0))
        return {**row, "seed": 1, "config_hash": row["config_hash"] + "-seed1",
                "accuracy": float(samples["score"].mean())}, samples

    folder = synthetic_results(tmp_path / "seeds", seed=0)
    synthetic_results(folder, seed=1, edit=seed1)
    from gripbench.store import ResultsStore

    cells = ResultsStore(folder).cells()
    by_seed = cells.pivot_table(index=["task", "method", "budget"], columns="seed", values="accuracy")
    assert len(cells) == 28 and (by_seed[0] - by_seed[1]).max() > 0.15  # the seeds differ, a lot for `weak`
    assert compare(folder, folder).empty
    assert main(["check", str(folder), "--reference", str(folder)]) == 0
    assert "no regression" in capsys.readouterr().out


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
            old = ("latency_none_e2e_ms", "latency_ratio_runs", "latency_cpu_share")  # written before these columns
            return {k: v for k, v in row.items() if k not in old}, samples
        return apply

    old_ref = synthetic_results(tmp_path / "old_ref", edit=unpaired(lambda r, s: (r, s)))
    findings = compare(synthetic_results(tmp_path / "old_busy", edit=unpaired(busy)), old_ref)
    assert set(findings.metric) == {"latency_ratio"} and set(findings.method) == {"weak"}


def test_a_uniformly_slower_machine_is_not_a_regression(reference, tmp_path):
    def machine(row, samples):
        return {**row, **{k: v * 2.0 for k, v in row.items() if k.startswith("latency_") and k.endswith("_ms")}}, samples

    assert compare(synthetic_results(tmp_path / "m", edit=machine), reference).empty


@pytest.mark.parametrize("change, verdict", [(lambda f: f + 1, "regressed"), (lambda f: f * 0.9, "changed")],
                         ids=["one more FLOP", "10% fewer FLOPs"])
def test_flops_must_match_exactly(reference, tmp_path, change, verdict, capsys):
    def edit(row, samples):
        if row["method"] == "good" and row["task"] == "gripbench_text" and row["budget"] == 0.5:
            row = {**row, "flops_total": change(row["flops_total"])}
        return row, samples

    results = synthetic_results(tmp_path / "f", edit=edit)
    findings = compare(results, reference)
    assert list(zip(findings.metric, findings.method, findings.budget, findings.verdict)) == [
        ("flops_total", "good", 0.5, verdict)]
    assert failed(findings, Tolerances())
    assert main(["check", str(results), "--reference", str(reference)]) == 1
    assert "check FAILED" in capsys.readouterr().out


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
    cfg.write_text('[check]\nfail_on_missing = true\nmin_cpu_share = 0.5\nlatency_gate = "warn"\n')
    tol = load_config(cfg)
    assert (tol.fail_on_missing, tol.min_cpu_share, tol.latency_gate) == (True, 0.5, "warn")


@pytest.mark.parametrize("text, expected", [("false", False), ("no", False), ("0", False), ("False", False),
                                            ("true", True), ("yes", True), ("1", True)])
def test_fail_on_missing_text_means_what_it_says(text, expected):
    assert parse_tolerance(f"fail_on_missing:{text}", Tolerances(fail_on_missing=not expected)).fail_on_missing is expected


def test_tolerances_built_in_python_are_validated_too():
    with pytest.raises(GripbenchError, match="alpha"):
        Tolerances(alpha=float("nan"))
    with pytest.raises(GripbenchError, match="latency_gate"):
        Tolerances(latency_gate="loud")


@pytest.mark.parametrize("args, message", [
    (["check", "/nonexistent", "--reference", "/nonexistent"], "does not exist"),
    (["check", "{ref}", "--reference", "{ref}", "--tolerance", "speed:3"], "unknown tolerance"),
    (["check", "{ref}", "--reference", "{ref}", "--acc-tol", "lots"], "bad tolerance acc value"),
])
def test_bad_input_exits_2(reference, args, message, capsys):
    assert main([a.format(ref=reference) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


BAD_TOLERANCES = [  # (command-line options, or a [check] table, and the words of the one error line)
    (["--acc-tol", "nan"], "tolerance acc must be a finite number in [0, 1]"),
    (["--acc-tol", "inf"], "tolerance acc must be a finite number in [0, 1]"),
    (["--acc-tol=-150%"], "tolerance acc must be a finite number in [0, 1]"),
    (["--acc-tol", "2"], "tolerance acc must be a finite number in [0, 1]"),
    (["--latency-tol", "nan"], "tolerance latency_ratio must be a finite number >= 0"),
    (["--latency-tol", "inf"], "tolerance latency_ratio must be a finite number >= 0"),
    (["--latency-tol=-10%"], "tolerance latency_ratio must be a finite number >= 0"),
    (["--latency-tol", "fast"], "bad tolerance latency_ratio value 'fast'"),
    (["--alpha", "-0.05"], "tolerance alpha must be a finite number with 0 < alpha < 1, not -0.05"),
    (["--alpha", "0"], "0 < alpha < 1"),
    (["--alpha", "1"], "0 < alpha < 1"),
    (["--alpha", "nan"], "0 < alpha < 1"),
    (["--tolerance", "fail_on_missing:maybe"], "bad tolerance fail_on_missing value 'maybe' (expected true or false)"),
    (["--tolerance", "fail_on_missing:2"], "bad tolerance fail_on_missing value '2'"),
    (["--tolerance", "min_cpu_share:0"], "tolerance min_cpu_share must be a finite number in (0, 1]"),
    (["--tolerance", "min_cpu_share:1.5"], "tolerance min_cpu_share must be a finite number in (0, 1]"),
    (["--tolerance", "min_cpu_share:nan"], "tolerance min_cpu_share must be a finite number in (0, 1]"),
    (["--tolerance", "latency_gate:off"], "tolerance latency_gate must be 'fail' or 'warn', not 'off'"),
    (["--latency-gate", "loud"], "tolerance latency_gate must be 'fail' or 'warn', not 'loud'"),
    (["--tolerance", "acc"], "bad tolerance acc value ''"),
    ("check = 5", "`check` must be a [check] table of tolerances, not 5"),
    ("[check]\nspeed = 3", "unknown tolerance 'speed'"),
    ("[check]\nacc = nan", "tolerance acc must be a finite number in [0, 1]"),
    ("[check]\nacc = true", "bad tolerance acc value True"),
    ("[check]\nalpha = -0.05", "0 < alpha < 1, not -0.05"),
    ('[check]\nlatency_ratio = "inf%"', "tolerance latency_ratio must be a finite number >= 0"),
    ('[check]\nfail_on_missing = "perhaps"', "bad tolerance fail_on_missing value 'perhaps'"),
    ("[check]\nfail_on_missing = 1", "bad tolerance fail_on_missing value 1"),
    ("[check]\nlatency_gate = 1", "tolerance latency_gate must be 'fail' or 'warn', not 1"),
    ("[check\nacc = 0.1", "cannot read check config"),
]


@pytest.mark.parametrize("bad, message", BAD_TOLERANCES, ids=[str(b) for b, _ in BAD_TOLERANCES])
def test_bad_tolerance_exits_2_with_one_line(reference, tmp_path, bad, message, capsys):
    if isinstance(bad, str):
        (tmp_path / "check.toml").write_text(bad + "\n")
        bad = ["--config", str(tmp_path / "check.toml")]
    assert main(["check", str(reference), "--reference", str(reference), *bad]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err, captured.err


def test_corrupt_reference_exits_2(reference, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    victim = sorted((broken / "cells.d").glob("*.parquet"))[0]
    victim.write_bytes(b"not parquet")
    assert main(["check", str(reference), "--reference", str(broken)]) == 2
    assert victim.name in capsys.readouterr().err


def test_latency_timed_concurrently_is_not_gated(reference, tmp_path):
    """A cell timed while other cells shared its node (Ray) is `unreliable`, never `regressed`."""
    def concurrent(row, samples):
        row, samples = slower(1.5)(row, samples)
        return {**row, "latency_concurrent": True}, samples

    findings = compare(synthetic_results(tmp_path / "ray", edit=concurrent), reference)
    assert set(findings.verdict) == {"unreliable"} and len(findings) == 6
    assert findings["detail"].str.contains("latency_concurrent").all() and not failed(findings, Tolerances())
