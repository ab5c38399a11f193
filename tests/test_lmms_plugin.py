"""The `gripbench` lmms-eval model plugin: model_args, failures exiting non-zero, and the
timings/token counts in lmms-eval's throughput and efficiency output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

GOOD_ARGS = ('pretrained=embedded,method=fastv,budget=0.25,method_args="fastv:K=2,R=0.5",dtype=float32,'
             'attn_implementation=eager,batch_size=4,device=cpu,seed=1')
FASTVV = "gripbench: error: unknown method 'fastvv' (did you mean 'fastv'?)"


@pytest.fixture(scope="module")
def include_path():
    from gripbench.lmms.tasks import materialize

    return str(materialize(["text"]))


@pytest.fixture(scope="module")
def cli(include_path, tmp_path_factory):
    """Two real `python -m lmms_eval eval` runs, started together (each spends ~15 s importing
    lmms-eval and indexing its stock tasks): `result(name)` waits for one -> (rc, stdout, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    root = tmp_path_factory.mktemp("lmms_cli")
    base = [sys.executable, "-m", "lmms_eval", "eval", "--model", "gripbench", "--tasks", "gripbench_text",
            "--include_path", include_path, "--limit", "8"]
    runs = {"bad": [*base, "--model_args", "method=fastvv"],
            "good": [*base, "--model_args", GOOD_ARGS, "--log_samples", "--output_path", str(root / "out")]}
    procs = {}
    for name, cmd in runs.items():  # files, not pipes: a full pipe would stall the run not being read
        with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)

    def result(name):
        rc = procs[name].wait(timeout=300)
        return rc, (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()

    yield result, root / "out"
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def test_cli_exits_non_zero_with_one_line_on_a_bad_method(cli):
    result, _ = cli
    rc, out, err = result("bad")
    assert rc == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == FASTVV
    assert "Traceback" not in out + err


def test_cli_takes_every_option_and_reports_timings_and_token_counts(cli):
    result, folder = cli
    rc, out, err = result("good")
    assert rc == 0, err[-2000:]
    assert "gripbench_text" in out and "exact_match" in out
    # lmms-eval's printed Throughput Summary carries gripbench's timings and token counts
    assert "Throughput Summary" in out
    for key in ("avg_prefill_time", "avg_decode_time", "avg_vision_time", "avg_visual_tokens_llm_input", "avg_batch_size"):
        assert key in out, key
    (path,) = folder.rglob("*_results.json")
    res = json.loads(path.read_text())
    assert res["config"]["model_args"] == GOOD_ARGS
    tp = res["throughput"]
    assert tp["avg_batch_size"] == 4.0  # batch_size=4 from model_args beat --batch_size's default of 1
    assert tp["avg_prefill_time"] > 0 and tp["avg_decode_time"] >= 0 and tp["total_elapsed_time"] > 0
    assert tp["avg_visual_tokens_llm_input"] == 144  # FastV prunes inside the LLM (at layer K=2)...
    assert tp["avg_visual_tokens_layer_avg"] < 144  # ...so fewer visual tokens from there on
    assert tp["avg_latency"] == pytest.approx(tp["total_elapsed_time"] / 8)
    # per-request TokenCounts: the logged samples' token_counts, summed into results["efficiency"]
    eff = res["efficiency"]["overall"]
    assert eff["docs_with_token_counts"] == 8
    assert eff["total_output_tokens"] == tp["total_gen_tokens"] > 0
    assert eff["total_input_tokens"] == pytest.approx(8 * tp["avg_input_tokens"])
    assert eff["total_input_tokens"] > 8 * 144  # the prompt with every visual token


def test_model_args_parse_as_strings_with_quotes():
    from gripbench.lmms.model import parse_model_args

    got = parse_model_args(' method=fastv, method_args="fastv:K=2,R=0.5", pretrained=\'007\',seed=1e-3 ')
    assert got == {"method": "fastv", "method_args": "fastv:K=2,R=0.5", "pretrained": "007", "seed": "1e-3"}
    assert parse_model_args("") == {}


@pytest.mark.parametrize("args, message", [
    ("method=fastvv", "unknown method 'fastvv' (did you mean 'fastv'?)"),
    ("method=fastv,budget=2", "budget 2 is outside (0, 1]"),
    ("method=fastv,budget=abc", "budget of fastv must be a number in (0, 1], not 'abc'"),
    ("pretrained=/nonexistent/ckpt", "model folder /nonexistent/ckpt does not exist"),
    ("methd=fastv", "unknown model_args key 'methd' (did you mean 'method'?); options: pretrained, model, method"),
    ("method=fastv,Kk=2", "unknown model_args key 'Kk' (did you mean 'K'?)"),
    ("method=fastv,K=x", "parameter K of fastv must be"),
    ("method=fastv,method_args=grip:scorer=x", "method_args names 'grip', not method 'fastv'"),
    ("method=fastv,K=2,method_args='fastv:K=3'", "parameter 'K' of 'fastv' is given twice"),
    ("method=fastv,method_args=fastv", "bad method arguments 'fastv'"),
    ("dtype=fp64", "unknown dtype 'fp64' (known: bfloat16, float16, float32)"),
    ("attn_implementation=sdp", "unknown attn_implementation 'sdp' (did you mean 'sdpa'?)"),
    ("attn_implementation=flash_attention_2", "unknown attn_implementation 'flash_attention_2'"),
    ("device=gpu", "device 'gpu' is not a torch device"),
    ("batch_size=auto", "batch_size must be a positive integer, not 'auto'"),
    ("batch_size=0", "batch_size must be a positive integer"),
    ("method", "model_args item 'method' is not KEY=VALUE"),
    ("method=fastv,method=none", "model_args gives 'method' twice"),
    ("engine=x", "model_args cannot set 'engine'"),
])
def test_bad_model_args_are_one_line_errors(args, message):
    from gripbench.errors import GripbenchError
    from gripbench.lmms.model import GripbenchLMM

    with pytest.raises(GripbenchError) as e:  # all caught before any weights load
        GripbenchLMM.create_from_arg_string(args, {"batch_size": 1, "max_batch_size": None, "device": None})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_model_args_options_are_applied():
    import torch

    from gripbench.lmms.model import GripbenchLMM

    lm = GripbenchLMM.create_from_arg_string(
        'model=embedded,method=fastv,budget=0.5,method_args="fastv:K=2",R=0.5,dtype=bfloat16,'
        "attn_implementation=eager,batch_size=3,device=cpu,seed=7", {"batch_size": 1, "max_batch_size": None, "device": None})
    m = lm.method
    assert (m.name, m.budget, m.seed, m.K, m.R) == ("fastv", 0.5, 7, 2, 0.5)
    assert lm.batch_size_per_gpu == 3
    assert next(lm.engine.model.parameters()).dtype == torch.bfloat16 and lm.engine.device.type == "cpu"
    cfg = lm.engine.model.config
    assert cfg.text_config._attn_implementation == cfg.vision_config._attn_implementation == "eager"
    # lmms-eval's --batch_size (always passed, default 1) applies when model_args has none
    assert GripbenchLMM.create_from_arg_string("", {"batch_size": 5}).batch_size_per_gpu == 5


def test_attn_implementation_switch_keeps_answers(samples):
    """Switching the kernel after loading is what loading with it does: the engine calls the
    model's layers, which read the config on every forward."""
    import torch

    from gripbench.lmms.model import GripbenchLMM

    outs = {}
    for impl in ("eager", "sdpa"):
        lm = GripbenchLMM(attn_implementation=impl, method="fastv", budget=0.25, device="cpu")
        e = lm.engine
        batch = e.prepare([s.image for s in samples[:4]], [s.question for s in samples[:4]])
        outs[impl] = (e.generate(batch, lm.method, max_new_tokens=4).texts, e.logits(batch, lm.method)[0])
    assert outs["eager"][0] == outs["sdpa"][0]
    assert torch.allclose(outs["eager"][1], outs["sdpa"][1], atol=1e-4)


def _fake_cli(monkeypatch):
    """Stands in for lmms_eval.__main__: a `cli_evaluate` that swallows every Exception, as
    lmms-eval 0.7.3's does (the real one is exercised by the subprocess tests)."""
    mod = types.ModuleType("lmms_eval.__main__")

    def cli_evaluate(run):
        try:
            return run()
        except Exception as e:
            return e

    mod.cli_evaluate = cli_evaluate
    monkeypatch.setitem(sys.modules, "lmms_eval.__main__", mod)
    return cli_evaluate


def test_failures_exit_non_zero_only_under_the_cli(embedded, include_path, monkeypatch, capsys):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from gripbench.engine import Engine
    from gripbench.errors import GripbenchError
    from gripbench.lmms.model import GripbenchLMM

    lm = GripbenchLMM(engine=Engine(*embedded), batch_size=4)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lm.engine, "generate", boom)
    tm = TaskManager(include_path=include_path, include_defaults=False)

    def run():
        return simple_evaluate(model=lm, tasks=["gripbench_text"], limit=2, task_manager=tm, batch_size=4)

    # from Python (the sweep): the exception itself
    with pytest.raises(RuntimeError, match="boom"):
        run()
    with pytest.raises(GripbenchError, match="unknown method 'fastvv'"):
        GripbenchLMM(method="fastvv")
    cli_evaluate = _fake_cli(monkeypatch)
    # under lmms-eval's CLI, which would swallow it: SystemExit, 1 for a crash...
    with pytest.raises(SystemExit) as e:
        cli_evaluate(run)
    assert e.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "gripbench: error: generate_until failed: RuntimeError: boom"
    # ...2 and one line, no traceback, for bad input
    with pytest.raises(SystemExit) as e:
        cli_evaluate(lambda: GripbenchLMM.create_from_arg_string("method=fastvv", {"batch_size": 1}))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == FASTVV
    # an exception the plugin does not raise is still lmms-eval's to handle
    assert isinstance(cli_evaluate(lambda: 1 / 0), ZeroDivisionError)


def test_loglikelihood_returns_what_lmms_eval_can_unwrap(embedded, samples):
    """A bare (float, bool) tuple would become its string in lmms-eval (unwrap_generation_output)."""
    from lmms_eval.api.instance import unwrap_generation_output

    from gripbench.engine import Engine
    from gripbench.lmms.model import GripbenchLMM

    s = samples[0]
    lm = GripbenchLMM(engine=Engine(*embedded))
    lm.task_dict = {"t": {"test": {0: {"q": s.question}}}}
    req = types.SimpleNamespace(args=(s.question, s.answer, lambda doc: [s.image], 0, "t", "test"))
    (text, counts), = [unwrap_generation_output(r) for r in lm.loglikelihood([req])]
    assert isinstance(text, tuple) and isinstance(text[0], float) and isinstance(text[1], bool)
    assert counts.input_tokens > 144 and counts.output_tokens == 0
