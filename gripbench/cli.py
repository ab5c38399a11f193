"""The `gripbench` command line. Bad input -> one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import os
import sys

from gripbench.errors import GripbenchError


def _cmd_tasks(args) -> int:
    from gripbench.tasks.suite import TASKS

    if args.lmms_path:
        from gripbench.lmms.tasks import materialize

        print(materialize())
        return 0
    for name, desc in TASKS.items():
        print(f"{name:<10} {desc}")
    return 0


def _cmd_zoo(args) -> int:
    from gripbench.zoo import embedded_path

    if args.action == "path":
        print(embedded_path())
        return 0
    if args.action == "verify":
        import json

        if args.limit < 1:
            raise GripbenchError("--limit must be at least 1")

        from gripbench.engine import Engine
        from gripbench.testbed import measure
        from gripbench.zoo import load

        engine = Engine(*load(args.out or args.model or "embedded", device="cpu"))
        result = measure(engine, limit=args.limit)
        if args.diagnostics:
            from gripbench.testbed import diagnostics

            result["diagnostics"] = diagnostics(engine, limit=min(args.limit, 100))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0 if all(result["bars"].values()) else 1
    if args.family is not None:
        from gripbench.zoo import EMBEDDED
        from gripbench.zoo.build import BuildConfig, build

        if args.out is None:
            raise GripbenchError("zoo build --family: give --out (the shipped checkpoints are replaced only by hand)")
        overrides = {k: v for k, v in {"tune_steps": args.steps, "tune_batch": args.batch_size, "seed": args.seed,
                                       "eval_every": args.eval_every}.items() if v is not None}
        result = build(args.out, BuildConfig(family=args.family, **overrides))
        print(f"checkpoint written to {args.out} (the packaged ones: {', '.join(str(p) for p in EMBEDDED.values())})")
        return 0 if result["val"] else 1
    from gripbench.zoo.train import TrainConfig, train

    out = args.out or str(embedded_path(must_exist=False))
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                                   "eval_every": args.eval_every}.items() if v is not None}
    cfg = TrainConfig(**overrides)
    result = train(out, cfg)
    print(f"trained in {result['elapsed_s'] / 60:.1f} min; validation accuracy: "
          + ", ".join(f"{t} {a:.1%}" for t, a in result["val"].items()))
    print(f"checkpoint written to {out}")
    return 0


def _cmd_methods(args) -> int:
    from gripbench.methods import registry

    if args.model is None:
        for name, summary in registry().describe().items():
            print(f"{name:<16} {summary}")
        return 0
    from gripbench.engine import Engine
    from gripbench.methods import lowest_budget, parse_method_args
    from gripbench.zoo import load

    info = Engine(*load(args.model, device="cpu")).info
    params = parse_method_args(args.method_args) if args.method_args else {}
    print(f"{args.model}: {info.num_visual_tokens} visual tokens, {info.num_layers} LLM layers")
    print(f"{'method':<16} {'accounting':<10} {'lowest budget':>13}  plan at rho = 0.25 (layer: tokens kept)")
    for name in registry().names():
        method = registry().create(name, budget=0.25, **params.get(name, {}))
        plan = ", ".join(f"{p.layer}: {p.keep}" for p in method.plan(info)) or "-"
        print(f"{name:<16} {method.accounting:<10} {lowest_budget(method, info):>13.4f}  {plan}")
    return 0


def _cmd_sweep(args) -> int:
    from gripbench.sweep import run_sweep

    res = run_sweep(model=args.model, methods=args.methods, tasks=args.tasks, budgets=args.budgets, limit=args.limit,
                    out=args.out, seed=args.seed, executor=args.executor, batch_size=args.batch_size, verbose=args.verbose,
                    keep_stale=args.keep_stale, method_args=args.method_args, include_path=args.include_path,
                    allow_judge=args.allow_judge, cpus_per_cell=args.cpus_per_cell)
    rate = res.ran / (res.seconds / 60) if res.seconds > 0 else 0.0
    stale = f" ({res.stale} stale recomputed)" if res.stale and not res.kept_stale else (
        f" ({res.kept_stale} of them stale, kept with --keep-stale)" if res.kept_stale else "")
    print(f"{res.ran} cells run, {res.skipped} already finished{stale}, in {res.seconds / 60:.1f} min "
          f"({rate:.1f} cells/min); results in {res.out}")
    return 0


def _cmd_train(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from gripbench.engine import Engine
    from gripbench.grip.data import load_data
    from gripbench.grip.method import WEIGHTS, check_scorer_model, load_scorer, scorer_metadata
    from gripbench.grip.train import ScorerTrainConfig, train_dynamicvit, train_grpo, train_warmup
    from gripbench.store import disk_error
    from gripbench.zoo import load

    cfg = ScorerTrainConfig(seed=args.seed)
    if args.steps is not None:
        if args.steps < 1:
            raise GripbenchError("--steps must be at least 1")
        key = {"warmup": "warmup_steps", "grip": "grpo_steps", "dynamicvit": "dynamicvit_steps"}[args.what]
        cfg = replace(cfg, **{key: args.steps})
    for name in ("batch", "val_every", "val_samples"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise GripbenchError(f"--{name.replace('_', '-')} must be at least 1")
            cfg = replace(cfg, **{name: value})
    out = Path(args.out or f"results/train-{args.what}")
    if out.exists() and not out.is_dir():
        raise GripbenchError(f"--out {out} is a file: give a folder for the scorer and its log")
    ref = None
    if args.what == "grip":
        if args.reference:  # a reference named by the user must exist: never fall back silently
            ref = Path(args.reference)
            if not ref.is_file():
                raise GripbenchError(f"--reference {ref} does not exist (the warm-up scorer GRPO starts from)")
        else:
            ref = out / "grip-warmup.safetensors"
            if not ref.exists() and args.model == "embedded":
                ref = WEIGHTS / "grip-warmup.safetensors"
            if not ref.exists():
                raise GripbenchError(f"no warm-up scorer at {ref}: run `gripbench train warmup` first or pass --reference")
        scorer_metadata(ref)  # readable before the model loads
    data = load_data(args.data, seed=cfg.seed, val_per_task=cfg.val_per_task, val_samples=cfg.val_samples,
                     val_fraction=cfg.val_fraction, include_path=args.include_path, columns=args.columns)
    engine = Engine(*load(args.model))
    if ref is not None:
        check_scorer_model(ref, engine.model)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, f"--out {out}") from None
    if args.what == "warmup":
        train_warmup(engine, cfg, out, data=data)
    elif args.what == "dynamicvit":
        train_dynamicvit(engine, cfg, out, data=data)
    else:
        train_grpo(engine, cfg, out, load_scorer(str(ref)), data=data, reference_meta=scorer_metadata(ref))
    print(f"scorer and training log written to {out}")
    return 0


def _cmd_eval(args) -> int:
    from gripbench.evaluate import evaluate_tasks
    from gripbench.methods import parse_method_args

    params = parse_method_args(args.method_args or "")
    if set(params) - {args.method}:
        raise GripbenchError(f"--method-args names {sorted(set(params) - {args.method})[0]!r}, not --method {args.method!r}")
    evaluate_tasks(model=args.model, method=args.method, budget=args.budget, tasks=args.tasks,
                   limit=args.limit, batch_size=args.batch_size, seed=args.seed, params=params.get(args.method, {}),
                   include_path=args.include_path, allow_judge=args.allow_judge)
    return 0


def _cmd_report(args) -> int:
    from gripbench.report import write_report

    print(f"report written to {write_report(args.results, args.output, budget=args.budget)}")
    return 0


def _cmd_check(args) -> int:
    from gripbench.check import Tolerances, compare, failed, load_config, parse_tolerance, render, rules, set_tolerance

    tol = load_config(args.config) if args.config else Tolerances()
    for name, value in (("acc", args.acc_tol), ("latency_ratio", args.latency_tol), ("alpha", args.alpha),
                        ("latency_gate", args.latency_gate), ("fail_on_missing", "true" if args.fail_on_missing else None)):
        if value is not None:
            tol = set_tolerance(tol, name, value)
    tol = parse_tolerance(args.tolerance or "", tol)
    findings = compare(args.results, args.reference, tol)
    print(render(findings, tol))
    bad = failed(findings, tol)
    print(f"check {'FAILED' if bad else 'passed'} ({rules(tol)})")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gripbench", description="Benchmark visual-token pruning methods for VLMs: "
                                "accuracy, FLOPs and latency for every method x budget x task.")
    p.add_argument("--version", action=_Version, help="print the versions that can change a result, and whether they "
                   "match gripbench/lock.txt")
    sub = p.add_subparsers(dest="command", required=True)

    tasks = sub.add_parser("tasks", help="list the embedded tasks")
    tasks.add_argument("--lmms-path", action="store_true",
                       help="write (once) the tasks as lmms-eval YAML + parquet and print the folder for --include_path")
    tasks.set_defaults(fn=_cmd_tasks)
    me = sub.add_parser("methods", help="list the registered pruning methods; with --model, the budgets each can reach")
    me.add_argument("--model", help="also print, per method, the smallest budget it can meet on this model and its plan")
    me.add_argument("--method-args", help="typed method parameters, as for sweep")
    me.set_defaults(fn=_cmd_methods)

    zoo = sub.add_parser("zoo", help="the embedded tiny LLaVA: print its folder or retrain it")
    zoo.add_argument("action", choices=["path", "build", "verify"],
                     help="path: print the checkpoint folder; build: retrain it; verify: check the testbed's four bars")
    zoo.add_argument("--out", help="checkpoint folder to write (build) or check (verify); default: the package's")
    zoo.add_argument("--limit", type=int, default=300, help="verify: test questions per task")
    zoo.add_argument("--model", help="verify: embedded (default), embedded-qwen, or a checkpoint folder (as --out)")
    zoo.add_argument("--diagnostics", action="store_true",
                     help="verify: also each training-free method's evidence recall at rho 0.25 and its macro accuracy at "
                          "0.125, ranked against published LLaVA-1.5-7B results with Kendall's tau")
    zoo.add_argument("--family", choices=["llava", "qwen2-vl"],
                     help="build with the real-VLM recipe of gripbench/zoo/build.py (contrastive tower, LM pretraining, "
                          "LLaVA's two stages) for this family; without it, the recipe of the shipped checkpoint")
    zoo.add_argument("--json", help="verify: also write the figures to this JSON file")
    zoo.add_argument("--steps", type=int, help="build: training steps (default: TrainConfig's)")
    zoo.add_argument("--batch-size", type=int)
    zoo.add_argument("--eval-every", type=int)
    zoo.add_argument("--seed", type=int)
    zoo.set_defaults(fn=_cmd_zoo)

    sw = sub.add_parser("sweep", help="accuracy, FLOPs and latency for every method x budget x task (resumable)")
    sw.add_argument("--model", default="embedded", help="embedded, a local checkpoint folder, or a Hugging Face id")
    sw.add_argument("--methods", default="all")
    sw.add_argument("--tasks", default="all", help="embedded task names ('all': the embedded suite), or any lmms-eval "
                    "task or group (pope, mme, textvqa_val, ...; with --include-path, your own)")
    sw.add_argument("--budgets", default="1,0.5,0.25,0.125,0.0625")
    sw.add_argument("--limit", type=int, default=300,
                    help="questions per task (default 300: 95%% CI half-width about 4 points at 85%% accuracy)")
    sw.add_argument("--out", help="results folder (default: a new folder under results/); rerun to resume")
    sw.add_argument("--executor", default="local", choices=["local", "ray"],
                    help="local: cells one after another in this process; ray: one Ray task per cell on RAY_ADDRESS's "
                         "cluster (or a local one); cells come back to this process, which alone writes --out")
    sw.add_argument("--cpus-per-cell", type=int, default=1,
                    help="ray: CPUs each cell's task reserves, and its torch threads (default 1)")
    sw.add_argument("--batch-size", type=int, default=32)
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--method-args", help="typed method parameters, e.g. 'fastv:K=2,R=0.5;grip:scorer=PATH' "
                    "(see `gripbench methods`); recorded in each cell's method_params")
    _task_options(sw)
    sw.add_argument("--verbose", action="store_true", help="show lmms-eval's logs and per-task progress bars")
    sw.add_argument("--keep-stale", action="store_true", help="reuse finished cells whose method code, weights, task or "
                    "gripbench code changed since (recorded in the manifest); by default they are recomputed")
    sw.set_defaults(fn=_cmd_sweep)

    rp = sub.add_parser("report", help="write a self-contained HTML report of a results folder")
    rp.add_argument("results", help="results folder of a sweep")
    rp.add_argument("-o", "--output", help="HTML file to write (default reports/<folder name>.html)")
    rp.add_argument("--budget", type=float, default=0.25, help="budget shown in the gallery, latency and significance")
    rp.set_defaults(fn=_cmd_report)

    ck = sub.add_parser("check", help="regression gates: compare a results folder with a reference (exit 1 on regression)")
    ck.add_argument("results")
    ck.add_argument("--reference", required=True)
    ck.add_argument("--acc-tol", help="largest accuracy drop that is not a regression, e.g. -0.02 or --acc-tol=-2%% "
                    "(default 0.02)")
    ck.add_argument("--latency-tol", help="largest growth of the latency ratio to none, e.g. +10%% (default 25%%)")
    ck.add_argument("--alpha", help="significance level of the paired accuracy test (McNemar, or Wilcoxon on soft "
                    "scores) and of Mann-Whitney on latency runs (default 0.05)")
    ck.add_argument("--latency-gate", metavar="{fail,warn}",
                    help="fail (default): a significant latency regression fails; warn: it is reported as slower")
    ck.add_argument("--tolerance", help="all at once, e.g. acc:-0.02,latency_ratio:+10%%,min_cpu_share:0.8,latency_gate:warn")
    ck.add_argument("--config", help="TOML file with a [check] table of tolerances (the command line wins)")
    ck.add_argument("--fail-on-missing", action="store_true", help="a reference cell missing from the results fails")
    ck.set_defaults(fn=_cmd_check)

    tr = sub.add_parser("train", help="train a scorer: warmup (supervised), grip (GRPO), dynamicvit (relaxation)")
    tr.add_argument("what", choices=["warmup", "grip", "dynamicvit"])
    tr.add_argument("--model", default="embedded")
    tr.add_argument("--out", help="output folder (default results/train-WHAT)")
    tr.add_argument("--reference", help="grip: the warm-up scorer to start from and stay close to")
    tr.add_argument("--steps", type=int)
    tr.add_argument("--seed", type=int, default=0, help="seeds the data order, the validation carve, budgets and noise")
    tr.add_argument("--data", default="embedded", metavar="SPEC",
                    help="what to train on: embedded (the procedural suite; default), lmms:TASK[:SPLIT] (an lmms-eval "
                    "task, scored by its own metric; default split: its training split, else validation, else test), "
                    "a folder with data.jsonl or a .jsonl file ({image: relative path, question, answer} per line), or "
                    "a folder written by datasets' save_to_disk [PATH:SPLIT]; a validation part is carved out under --seed")
    tr.add_argument("--include-path", help="a folder of lmms-eval task YAMLs (for --data lmms:TASK)")
    tr.add_argument("--columns", help="JSONL/saved dataset: which fields hold image, question and answer, "
                    "e.g. image=img,question=q,answer=a")
    tr.add_argument("--batch", type=int, help="questions per step (default 16)")
    tr.add_argument("--val-every", type=int, help="validate every N steps (default 100, and at the end)")
    tr.add_argument("--val-samples", type=int, help="non-embedded data: at most N held-out validation samples "
                    "(default 300, at most 20%% of the data)")
    tr.set_defaults(fn=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate one method at one budget on embedded or lmms-eval tasks")
    ev.add_argument("--model", default="embedded")
    ev.add_argument("--method", default="none")
    ev.add_argument("--budget", type=float, default=1.0)
    ev.add_argument("--tasks", default="all", help="as for sweep: embedded names, or any lmms-eval task or group")
    ev.add_argument("--limit", type=int, default=None, help="questions per task (default: the whole test split)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--method-args", help="typed parameters of the method, e.g. 'fastv:K=2,R=0.5'")
    _task_options(ev)
    ev.set_defaults(fn=_cmd_eval)
    return p


def _task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="a folder of your own lmms-eval task YAMLs (repeatable); renamed copies of stock tasks included")
    p.add_argument("--allow-judge", action="store_true",
                   help="run tasks scored by an external LLM judge (e.g. MMBench's GPT matching); refused by default")


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from gripbench.versions import version_text

        print(version_text())
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except GripbenchError as e:
        print(f"gripbench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the user's filesystem: read-only, full, a file where a folder belongs
        from gripbench.store import disk_error

        print(f"gripbench: error: {disk_error(e, 'a file')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # 128 + SIGINT, as shells report it; not the bad-input status
        print("gripbench: interrupted; finished results on disk are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
