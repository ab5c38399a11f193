"""The `gripbench` lmms-eval model: any supported VLM with any pruning method at any budget.

    lmms-eval eval --model gripbench --tasks gripbench_text --include_path "$(gripbench tasks --lmms-path)" \\
        --model_args 'pretrained=embedded,method=fastv,budget=0.25,method_args="fastv:K=2,R=0.5",dtype=float32'

Registered through lmms-eval's entry-point group `lmms_eval.models` (gripbench/lmms/plugin.py).

model_args (every value may be quoted; a value holding commas must be):
  pretrained (or model)  'embedded' (default), a checkpoint folder or a Hugging Face id (offline cache)
  method, budget, seed   the pruning method, its budget rho in (0, 1] and its seed
  method_args            gripbench's --method-args syntax, e.g. "fastv:K=2,R=0.5"; it may only name `method`
  KEY=VALUE              any other key is a parameter of the method, as in method_args (K=2)
  batch_size             requests per forward pass (wins over lmms-eval's --batch_size, which defaults to 1)
  dtype                  float32 | float16 | bfloat16 (default: float32 on CPU, float16 on CUDA)
  device                 cpu | cuda | cuda:N (wins over --device; default: cuda when available)
  attn_implementation    eager | sdpa: the attention kernel of the model's own layers
Values arrive as strings and are converted and checked here; a bad one is one GripbenchError line.

Failures exit non-zero: see `_cli_guard`.

Per request it keeps a record (kept indices, the three token counts) that the sweep runner
reads, returns lmms-eval `TokenCounts` (the logged samples' `token_counts`, summed by
lmms-eval into `results["efficiency"]` when samples are logged) and, once per
`generate_until` call, logs gripbench's own timings and token counts through lmms-eval's
`log_metrics` (the "Throughput Summary" table and `results["throughput"]`).
`clean()` is a no-op: lmms-eval's own deletes every module attribute, which would make one
instance unusable for a second evaluation.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from gripbench.engine import Engine
from gripbench.errors import GripbenchError, unknown
from gripbench.methods import create_method, param_specs, parse_method_args, registry

# The options of model_args besides the method's own parameters, in the order the errors list them.
OPTIONS = ("pretrained", "model", "method", "budget", "method_args", "batch_size", "dtype", "device",
           "attn_implementation", "seed")
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Only kernels that honour the engine's explicit additive 4-D mask (pruned sequences have gaps
# in their positions and per-layer key masks): flash-attention kernels read padding only.
_ATTN = ("eager", "sdpa")


def _swallowing_cli_frame() -> bool:
    """True when lmms-eval's `cli_evaluate` is on the call stack: the one caller that catches
    every `Exception` (lmms_eval/__main__.py, `except Exception` around `cli_evaluate_single`),
    logs it and returns, so the process exits 0 after a failure."""
    main = sys.modules.get("lmms_eval.__main__")
    code = getattr(getattr(main, "cli_evaluate", None), "__code__", None)
    if code is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _cli_guard(where: str):
    """Make a failure of the plugin end `lmms-eval eval` with a non-zero status.

    lmms-eval 0.7.3's `cli_evaluate` wraps each evaluation in `except Exception`, prints the
    traceback, logs "Error during evaluation" and carries on, and both `python -m lmms_eval`
    and the `lmms-eval` script then exit 0 (`sys.exit(0)` in lmms_eval/__main__.py; the script
    returns None from `lmms_eval.cli.dispatch.main`). It offers no option to fail instead
    (only `--verbosity DEBUG` re-raises). So, only while that `cli_evaluate` is on the stack,
    an exception leaving the plugin is printed as one line on stderr (`gripbench: error: ...`,
    with the traceback too for an unexpected exception or at DEBUG verbosity) and turned into
    `SystemExit`: a BaseException, which Python defines precisely so that `except Exception`
    does not catch it. Status 2 for a GripbenchError (bad input, as the gripbench CLI), 1 for
    anything else. Called from Python (the sweep, `simple_evaluate`), errors raise as usual."""

    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not _swallowing_cli_frame():
                    raise
                expected = isinstance(e, GripbenchError)
                if not expected or os.environ.get("VERBOSITY", "").upper() == "DEBUG":
                    traceback.print_exc()
                message = str(e) if expected else f"{where} failed: {type(e).__name__}: {e}"
                print(f"gripbench: error: {message}", file=sys.stderr, flush=True)
                raise SystemExit(2 if expected else 1) from None

        return guarded

    return wrap


def _split_model_args(text: str) -> list[str]:
    """Split at commas outside single or double quotes."""
    items, current, quote = [], [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote:
        raise GripbenchError(f"model_args {text!r} has an unclosed {quote} quote")
    items.append("".join(current))
    return [i.strip() for i in items if i.strip()]


def parse_model_args(text: str) -> dict[str, str]:
    """'method=fastv,method_args="fastv:K=2,R=0.5"' -> {'method': 'fastv', 'method_args': 'fastv:K=2,R=0.5'}.
    Values stay strings (lmms-eval's own parser would turn '1e-3' or '007' into numbers and
    split a quoted value at its commas); the model converts and checks each."""
    out: dict[str, str] = {}
    for item in _split_model_args(text or ""):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise GripbenchError(f"model_args item {item!r} is not KEY=VALUE (expected e.g. 'method=fastv,budget=0.25')")
        if key in out:
            raise GripbenchError(f"model_args gives {key!r} twice")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def _positive_int(name: str, value) -> int:
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        hint = " ('auto' is not supported)" if str(value).startswith("auto") else ""
        raise GripbenchError(f"{name} must be a positive integer, not {value!r}{hint}") from None
    if n < 1:
        raise GripbenchError(f"{name} must be a positive integer, not {value!r}")
    return n


def _dtype(value):
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name in ("", "auto"):
        return None
    if name not in _DTYPES:
        raise unknown("dtype", str(value), ["float32", "float16", "bfloat16"])
    return getattr(torch, _DTYPES[name])


def _device(value) -> str | None:
    import torch

    if value is None or str(value).strip() in ("", "auto"):
        return None
    try:
        dev = torch.device(str(value).strip())
    except (RuntimeError, ValueError):
        raise GripbenchError(f"device {value!r} is not a torch device: give cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GripbenchError(f"device {value!r}: CUDA is not available here; use device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GripbenchError(f"device {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def _attn(value) -> str | None:
    if value is None or str(value).strip() == "":
        return None
    name = str(value).strip()
    if name not in _ATTN:
        raise unknown("attn_implementation", name, list(_ATTN))
    return name


def _set_attn(vlm, impl: str, pretrained: str) -> None:
    """Switch the loaded model's attention kernel (every sub-model). The engine calls the
    model's own layers, which read `config._attn_implementation` on every forward, so this is
    the same as loading with `attn_implementation=` (zoo.load does not take it)."""
    try:
        vlm.set_attn_implementation(impl)
    except Exception as e:  # an unavailable kernel, a model that cannot switch
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GripbenchError(f"cannot set attn_implementation={impl!r} on model {pretrained!r}: {first}") from None
    cfg = getattr(vlm.config, "text_config", None) or vlm.config
    if cfg._attn_implementation != impl:
        raise GripbenchError(f"model {pretrained!r} cannot switch its attention to {impl!r} "
                             f"(it stays {cfg._attn_implementation!r})")


def _truncate(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


class GripbenchLMM(lmms):
    is_simple = True

    @classmethod
    @_cli_guard("model_args")
    def create_from_arg_string(cls, arg_string, additional_config: dict | None = None):
        """How lmms-eval builds the model from `--model_args` (evaluator.simple_evaluate), with
        its own `{batch_size, max_batch_size, device}` from --batch_size/--max_batch_size/--device.
        A key given in model_args wins: --batch_size always arrives (its default is 1)."""
        args = dict(arg_string) if isinstance(arg_string, dict) else parse_model_args(arg_string)
        if "engine" in args:
            raise GripbenchError("model_args cannot set 'engine' (pass pretrained=...)")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @_cli_guard("loading the gripbench model")
    def __init__(self, pretrained: str | None = None, method: str = "none", budget: float = 1.0, seed: int = 0,
                 batch_size: int = 32, device: str | None = None, engine: Engine | None = None, dtype=None,
                 attn_implementation: str | None = None, method_args: str | dict | None = None,
                 model: str | None = None, max_batch_size=None, **method_params):
        super().__init__()
        from gripbench.zoo import load

        if pretrained is not None and model is not None and str(pretrained) != str(model):
            raise GripbenchError(f"model_args give both pretrained={pretrained!r} and model={model!r}: give one")
        pretrained = str(pretrained if pretrained is not None else model if model is not None else "embedded")
        if pretrained.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(pretrained)):
            # zoo.resolve reads any name with a '/' as a hub id, whose error says nothing of the folder
            raise GripbenchError(f"model folder {pretrained} does not exist")
        method = str(method)
        self.method = create_method(method, budget=budget, seed=seed, **self._method_params(method, method_args, method_params))
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        dtype, device, attn = _dtype(dtype), _device(device), _attn(attn_implementation)
        if engine is not None:
            given = [k for k, v in (("pretrained", pretrained != "embedded"), ("dtype", dtype), ("device", device),
                                    ("attn_implementation", attn)) if v]
            if given:
                raise GripbenchError(f"{', '.join(given)} cannot be set with an engine (the engine's model is already loaded)")
            self.engine = engine
        else:
            vlm, processor = load(pretrained, dtype=dtype, device=device)
            if attn is not None:
                _set_attn(vlm, attn, pretrained)
            self.engine = Engine(vlm, processor)
        self.records: list[dict] = []
        self.inputs: dict[str, list[tuple]] = {}  # task -> its first (image, prompt) pairs: the latency batch
        self.capture = 8
        self._vision: dict = {}  # (task, split, doc_id) -> VisionOutput row, reused across methods and budgets

    @staticmethod
    def _method_params(method: str, method_args, bare: dict) -> dict:
        """The method's parameters from method_args and bare keys; a key that is neither an
        option nor a parameter of the method is one line listing both."""
        cls = registry().load(method)  # an unknown method: "unknown method 'fastvv' (did you mean 'fastv'?)"
        specs = param_specs(cls)
        for key in bare:
            if key not in specs:
                import difflib

                close = difflib.get_close_matches(key, [*OPTIONS, *specs], n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                params = ", ".join(s.text() for s in specs.values()) or "none"
                raise GripbenchError(f"unknown model_args key {key!r}{hint}; options: {', '.join(OPTIONS)}; "
                                     f"parameters of method {method!r}: {params}")
        named = parse_method_args(method_args) if isinstance(method_args, str) else dict(method_args or {})
        others = sorted(set(named) - {method})
        if others:
            raise GripbenchError(f"method_args names {others[0]!r}, not method {method!r}")
        params = dict(named.get(method, {}))
        twice = sorted(set(params) & set(bare))
        if twice:
            raise GripbenchError(f"parameter {twice[0]!r} of {method!r} is given twice (as a key and in method_args)")
        return {**params, **bare}

    def set_method(self, method) -> None:
        self.method = method
        self.records = []
        self.inputs = {}

    def _sync(self) -> None:
        if self.engine.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.engine.device)

    @_cli_guard("generate_until")
    def generate_until(self, requests) -> list[GenerationResult]:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        out: list[GenerationResult | None] = [None] * len(requests)
        totals = dict.fromkeys(("vision", "scorer", "prefill", "decode"), 0.0)
        sums = dict.fromkeys(("decode_steps", "input_tokens", "output_tokens", "visual_tokens_llm_input",
                              "visual_tokens_layer_avg", "visual_tokens_kv"), 0.0)
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start:start + self.batch_size_per_gpu]
            contexts, gen_kwargs, to_visual, doc_ids, tasks, splits = zip(*[r.args for r in chunk])
            docs = [self.task_dict[t][s][d] for t, s, d in zip(tasks, splits, doc_ids)]
            images = [to_visual[i](doc)[0] for i, doc in enumerate(docs)]
            for task, image, context in zip(tasks, images, contexts):
                kept = self.inputs.setdefault(task, [])
                if len(kept) < self.capture:
                    kept.append((image, context))
            batch = self.engine.prepare(images, list(contexts))
            self._sync()
            t0 = time.perf_counter()
            vision = self._vision_for(list(zip(tasks, splits, doc_ids)), batch)
            self._sync()
            totals["vision"] += time.perf_counter() - t0
            kwargs = dict(gen_kwargs[0])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen = self.engine.generate(batch, self.method, max_new_tokens=int(kwargs.get("max_new_tokens", 16)),
                                       vision=vision)
            for key in ("scorer", "prefill", "decode"):
                totals[key] += gen.timings.get(key, 0.0)
            prompt_len = batch["attention_mask"].sum(1).tolist()
            for i, text in enumerate(gen.texts):
                n_out = int((gen.tokens[i] != self.engine.pad_id).sum())
                out[start + i] = GenerationResult(_truncate(text, until), TokenCounts(prompt_len[i], n_out))
                self.records.append({"task": tasks[i], "doc_id": doc_ids[i], "kept_indices": gen.kept_indices[i],
                                     "tokens_llm_input": gen.tokens_llm_input[i], "tokens_layer_avg": gen.tokens_layer_avg[i],
                                     "tokens_kv": gen.tokens_kv[i], "prompt_tokens": prompt_len[i],
                                     "new_tokens": n_out, "visual_per_layer": gen.visual_per_layer[i],
                                     "visual_tokens": vision[i].layout.size,  # before any pruning
                                     "info": self.engine.adapter.group_info(vision[i].layout),
                                     "vision_flops": self.engine.adapter.vision_flops(vision[i])})
                for key, value in (("decode_steps", gen.timings.get("decode_steps", 0)), ("input_tokens", prompt_len[i]),
                                   ("output_tokens", n_out), ("visual_tokens_llm_input", gen.tokens_llm_input[i]),
                                   ("visual_tokens_layer_avg", gen.tokens_layer_avg[i]), ("visual_tokens_kv", gen.tokens_kv[i])):
                    sums[key] += float(value)
        if requests:
            batches = -(-len(requests) // self.batch_size_per_gpu)
            self._log_throughput(log_metrics, len(requests), batches, totals, sums)
        return out

    @staticmethod
    def _log_throughput(log_metrics, n: int, batches: int, totals: dict, sums: dict) -> None:
        """One lmms-eval throughput record for this call: `total_elapsed_time` is the vision
        tower + scorer + prefill + decode time of every batch (seconds), `total_gen_tokens` the
        generated tokens, `total_requests` the requests (lmms-eval derives `avg_latency` and
        `avg_speed`), `batch_size` the mean requests per batch. The rest are per-request means
        over this call: times in seconds amortised over the batch (`*_time`), decode steps of
        the request's batch, prompt and generated tokens, and the visual tokens into the LLM /
        per layer / in the KV cache. lmms-eval prints each as `avg_<name>`, averaged over calls
        (one call per task)."""
        elapsed = sum(totals.values())
        gen_tokens = int(sums["output_tokens"])
        extra = {"total_requests": n, "batch_size": n / batches, **{f"{k}_time": v / n for k, v in totals.items()},
                 **{k: v / n for k, v in sums.items()}}
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=gen_tokens,
                    avg_speed=gen_tokens / elapsed if elapsed > 0 else 0.0, additional_metrics=extra)

    def _vision_for(self, keys: list[tuple], batch: dict) -> list:
        """Vision outputs for these docs, computed once per image for the whole sweep. A batch
        with any uncached doc runs the tower on the whole batch (families such as Qwen2-VL
        pack every image of a batch into one tensor, so rows cannot be cut out beforehand)."""
        if any(k not in self._vision for k in keys):
            for key, vo in zip(keys, self.engine.vision(batch)):
                self._vision.setdefault(key, vo)
        return [self._vision[k] for k in keys]

    @_cli_guard("generate_until_multi_round")
    def generate_until_multi_round(self, requests):
        return self.generate_until(requests)

    @_cli_guard("loglikelihood")
    def loglikelihood(self, requests):
        """(log p(continuation), greedy-correct) per request, wrapped in GenerationResult: lmms-eval
        turns a bare tuple into its string (api/instance.py `unwrap_generation_output`)."""
        import torch

        tok = self.engine.processor.tokenizer
        out = []
        for req in requests:
            context, to_target, to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            cont = to_target(doc) if callable(to_target) else str(to_target)
            batch = self.engine.prepare([to_visual(doc)[0]], [context])
            ids = tok(cont, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp, greedy, _ = self.engine.score(batch, self.method, torch.tensor([ids], device=self.engine.device))
            prompt = int(batch["attention_mask"].sum())
            out.append(GenerationResult((float(logp[0]), bool(greedy[0])), TokenCounts(prompt + len(ids), 0)))
        return out

    def clean(self):
        return None
