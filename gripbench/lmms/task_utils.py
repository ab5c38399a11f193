"""Functions the embedded tasks' lmms-eval YAMLs point to (`!function utils.*`)."""

from __future__ import annotations

from gripbench.evaluate import normalize


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc: dict, results: list) -> dict:
    return {"exact_match": float(normalize(results[0]) == doc["answer"])}
