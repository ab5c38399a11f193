"""`ScriptedLM`: an lmms-eval model that replies from a Python callable, for tests with known scores.

    lm = ScriptedLM(right_half)
    out = simple_evaluate(model=lm, tasks=["local_pope"], task_manager=TaskManager(include_path=root,
                          include_defaults=False), batch_size=8)

The callable is `answer(task, doc)` or, when it takes a third parameter (or a `doc_id` keyword),
`answer(task, doc, doc_id)`; `task` is the lmms-eval task name, `doc` the document lmms-eval
holds for the request (`self.task_dict[task][split][doc_id]`, images decoded). Each request's
`doc_to_visual(doc)` is also called, so broken image data fails here as it would in a real
model. Replies are plain `str` (lmms-eval 0.7.3's `unwrap_generation_output` accepts `str` or
`GenerationResult`). Every request is recorded in `lm.calls` (task, split, doc_id, context,
number of images, reply).

`right_half(task, doc, doc_id)` answers right on even doc ids and wrong on odd ones, except on
mme, which scores image *pairs* (acc + acc+): there the unit is the pair `doc_id // 2`, so the
even pairs are all right, the odd pairs all wrong, and acc+ is exercised. Right / wrong replies
come from `gripbench.testing.stock_tasks.correct_answer` / `wrong_answer`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from lmms_eval.api.model import lmms

from gripbench.testing.stock_tasks import correct_answer, stock_name, wrong_answer

Answer = Callable[..., str]


def _takes_doc_id(fn: Answer) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL or p.name == "doc_id" for p in params)


class ScriptedLM(lmms):
    """Replies `answer(task, doc[, doc_id])` to every generation request; no model, no tokenizer."""

    is_simple = True

    def __init__(self, answer: Answer, call_visuals: bool = True, **kwargs) -> None:
        super().__init__()
        self.answer = answer
        self.call_visuals = call_visuals
        self._with_id = _takes_doc_id(answer)
        self.calls: list[dict] = []

    def _reply(self, request) -> str:
        args = request.args
        context, doc_to_visual = args[0], args[2]
        doc_id, task, split = args[-3:]  # generate_until: 6 args; multi-round: 7 (doc_to_text inserted)
        doc = self.task_dict[task][split][doc_id]
        n_visuals = len(doc_to_visual(doc) or []) if self.call_visuals else None
        reply = self.answer(task, doc, doc_id) if self._with_id else self.answer(task, doc)
        reply = str(reply)
        self.calls.append({"task": task, "split": split, "doc_id": doc_id, "context": context,
                           "n_visuals": n_visuals, "reply": reply})
        return reply

    def generate_until(self, requests) -> list[str]:
        return [self._reply(r) for r in requests]

    def generate_until_multi_round(self, requests) -> list[str]:
        return [self._reply(r) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError("ScriptedLM only generates; none of the stock copies uses loglikelihood")

    def clean(self) -> None:
        """No-op: lmms-eval's `clean()` deletes module attributes and runs gc twice per evaluation."""


def right_half(task: str, doc: dict, doc_id: int) -> str:
    """Right on even doc ids, wrong on odd ones (mme: even / odd question pairs)."""
    unit = doc_id // 2 if stock_name(task) == "mme" else doc_id
    return correct_answer(task, doc) if unit % 2 == 0 else wrong_answer(task, doc)


def all_right(task: str, doc: dict) -> str:
    return correct_answer(task, doc)


def all_wrong(task: str, doc: dict) -> str:
    return wrong_answer(task, doc)
