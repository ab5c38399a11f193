"""`python3 -m gripbench.testing NAME[:KEY=VALUE,...] ...`: the contract checks for installed
methods on the embedded model, one PASS/FAIL line per check. Exit 0 when every check passes,
1 when one fails (or the method cannot be loaded), 2 for an unknown method or bad arguments."""

from __future__ import annotations

import argparse
import sys

from gripbench.errors import GripbenchError
from gripbench.methods import parse_method_args, registry
from gripbench.testing import CheckResult, contract_batch, method_factory, run_checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m gripbench.testing",
                                     description="Run gripbench's method contract checks on installed pruning methods.")
    parser.add_argument("methods", nargs="+", metavar="NAME[:KEY=VALUE,...]",
                        help="registered method name, optionally with parameters (fastv:K=2,R=0.5)")
    parser.add_argument("--model", default="embedded", help="embedded (default), a local checkpoint folder or a cached hub id")
    args = parser.parse_args(argv)
    reg = registry()
    todo = []  # (name, params, load error or None)
    try:
        for arg in args.methods:
            name, params = next(iter(parse_method_args(arg).items())) if ":" in arg else (arg.strip(), {})
            if name not in reg.names():
                reg.load(name)  # raises the one-line 'unknown method' error with the closest names
            try:
                reg.load(name)
            except GripbenchError as e:  # registered but broken: a contract failure, not a usage error
                todo.append((name, params, str(e)))
                continue
            reg.create(name, **params)  # a bad parameter is a usage error
            todo.append((name, params, None))
    except GripbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gripbench.engine import Engine
    from gripbench.zoo import load

    try:
        engine = Engine(*load(args.model, device="cpu"))
    except GripbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = contract_batch(engine)
    status = 0
    for name, params, broken in todo:
        print(name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "") + f" on {args.model}")
        results = [CheckResult("registry and parameters", [broken])] if broken else \
            run_checks(engine, method_factory(name, **params), batch, name=name)
        for result in results:
            print(result.line(), flush=True)
            status = status or (0 if result.passed else 1)
    return status

if __name__ == "__main__":
    sys.exit(main())
