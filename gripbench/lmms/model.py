"""The `gripbench` lmms-eval model: any supported VLM with any pruning method at any budget.

    lmms-eval eval --model gripbench --model_args pretrained=embedded,method=fastv,budget=0.25 \\
        --tasks gripbench_text --include_path "$(gripbench tasks --lmms-path)"

Registered through lmms-eval's entry-point group `lmms_eval.models` (gripbench/lmms/plugin.py).
Per request it keeps a record (kept indices, the three token counts, timings) that the
sweep runner reads. `clean()` is a no-op: lmms-eval's own deletes every module attribute,
which would make one instance unusable for a second evaluation.
"""

from __future__ import annotations

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from gripbench.engine import Engine
from gripbench.methods import create_method


def _truncate(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


class GripbenchLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "embedded", method: str = "none", budget: float = 1.0, seed: int = 0,
                 batch_size: int = 32, device: str | None = None, engine: Engine | None = None, **method_params):
        super().__init__()
        from gripbench.zoo import load

        self.engine = engine or Engine(*load(pretrained, device=device))
        self.method = create_method(method, budget=float(budget), seed=int(seed), **method_params)
        self.batch_size_per_gpu = int(batch_size)
        self.records: list[dict] = []
        self._vision: dict = {}  # (task, split, doc_id) -> VisionOutput row, reused across methods and budgets

    def set_method(self, method) -> None:
        self.method = method
        self.records = []

    def generate_until(self, requests) -> list[GenerationResult]:
        out: list[GenerationResult | None] = [None] * len(requests)
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start:start + self.batch_size_per_gpu]
            contexts, gen_kwargs, to_visual, doc_ids, tasks, splits = zip(*[r.args for r in chunk])
            docs = [self.task_dict[t][s][d] for t, s, d in zip(tasks, splits, doc_ids)]
            images = [to_visual[i](doc)[0] for i, doc in enumerate(docs)]
            batch = self.engine.prepare(images, list(contexts))
            vision = self._vision_for(list(zip(tasks, splits, doc_ids)), batch["pixel_values"])
            kwargs = dict(gen_kwargs[0])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen = self.engine.generate(batch, self.method, max_new_tokens=int(kwargs.get("max_new_tokens", 16)),
                                       vision=vision)
            prompt_len = batch["attention_mask"].sum(1).tolist()
            for i, text in enumerate(gen.texts):
                n_out = int((gen.tokens[i] != self.engine.pad_id).sum())
                out[start + i] = GenerationResult(_truncate(text, until), TokenCounts(prompt_len[i], n_out))
                self.records.append({"task": tasks[i], "doc_id": doc_ids[i], "kept_indices": gen.kept_indices[i],
                                     "tokens_llm_input": gen.tokens_llm_input[i], "tokens_layer_avg": gen.tokens_layer_avg[i],
                                     "tokens_kv": gen.tokens_kv[i], "prompt_tokens": prompt_len[i],
                                     "new_tokens": n_out, "visual_per_layer": gen.visual_per_layer})
        return out

    def _vision_for(self, keys: list[tuple], pixel_values):
        """Vision outputs for these docs, computed once per image for the whole sweep."""
        from gripbench.adapters import VisionOutput

        missing = [i for i, k in enumerate(keys) if k not in self._vision]
        if missing:
            fresh = self.engine.vision(pixel_values[missing])
            for j, i in enumerate(missing):
                self._vision[keys[i]] = fresh.select_rows([j])
        return VisionOutput.cat([self._vision[k] for k in keys])

    def generate_until_multi_round(self, requests):
        return self.generate_until(requests)

    def loglikelihood(self, requests):
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
            out.append((float(logp[0]), bool(greedy[0])))
        return out

    def clean(self):
        return None
