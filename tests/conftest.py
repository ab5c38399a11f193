"""Shared fixtures: the embedded model, a tiny random llava-hf-style model, fixed samples."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "GRIPBENCH_CACHE" not in os.environ:  # one task cache for the session (and its subprocesses), not ~/.cache
    import tempfile

    os.environ["GRIPBENCH_CACHE"] = tempfile.mkdtemp(prefix="gripbench-test-cache-")

import pytest
import torch

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden snapshots in tests/golden/ instead of comparing with them")


@pytest.fixture(scope="session")
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session")
def embedded():
    """(model, processor) of the shipped checkpoint, fp32 on CPU."""
    from gripbench.zoo import load

    return load("embedded", device="cpu")


def tiny_llava_hf(tmp_dir) -> str:
    """A randomly initialised llava-hf-style checkpoint (CLIP 56px/14 -> 16 tokens, 4-layer
    Llama with plain multi-head attention), saved with save_pretrained; returns its folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from gripbench.zoo.model import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(123)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # larger weights than the default init, so greedy outputs vary with the input
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>")
    model.save_pretrained(tmp_dir)
    proc.save_pretrained(tmp_dir)
    return str(tmp_dir)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(model, processor) of the tiny random llava-hf-style checkpoint, loaded from disk."""
    from gripbench.zoo import load

    return load(tiny_llava_hf(tmp_path_factory.mktemp("tiny_llava")), device="cpu")


@pytest.fixture(scope="session")
def samples():
    """Eight fixed validation questions, covering every task."""
    from gripbench.tasks.suite import TASKS, make_sample

    return [make_sample(t, "val", i) for i in range(2) for t in TASKS][:8]


RUN_SPREAD = (0.97, 1.04, 1.0, 0.95, 1.03)  # per-run paired latency ratios / the cell's ratio (median 1)


SYNTHETIC_IDENTITY = {"method_distribution": "synthetic", "method_version": "0", "method_source_sha256": "0" * 64,
                      "model_sha256": "synthetic", "task_sha256": "synthetic", "code_sha256": "synthetic"}


def synthetic_results(folder, methods=("none", "good", "weak"), tasks=("gripbench_text", "gripbench_counting"),
                      budgets=(1.0, 0.5, 0.25), n=120, seed=0, edit=None):
    """A results folder with known numbers and no model: per-sample scores (0/1) drawn with
    accuracy falling as the budget shrinks (faster for `weak`), FLOPs and latency linear in
    the kept tokens. `edit(cell_row, samples_frame)` may alter a cell before it is written."""
    import numpy as np
    import pandas as pd

    from gripbench.store import ResultsStore

    store = ResultsStore(folder).create()
    rng = np.random.default_rng(seed)
    base = rng.random(n)  # a per-sample difficulty shared by all methods, so cells are paired
    for task in tasks:
        for method in methods:
            for budget in ([1.0] if method == "none" else budgets):
                drop = {"none": 0.0, "good": 0.3, "weak": 0.9}.get(method, 0.5) * (1 - budget) * 0.5
                score = (base < 0.85 - drop).astype(float)
                tokens = 144 * budget
                row = {"model": "embedded", "task": task, "method": method, "method_params": "{}", "budget": budget,
                       "limit": n, "seed": 0, "config_hash": f"{task}-{method}-{budget}", "n_samples": n,
                       "metric": "exact_match,none", "metric_value": float(score.mean()), "accuracy": float(score.mean()),
                       "score_mean": float(score.mean()), "accuracy_unit": "sample",
                       "accuracy_ci_low": float(score.mean()) - 0.05,
                       "accuracy_ci_high": float(score.mean()) + 0.05, "tokens_llm_input": tokens,
                       "tokens_layer_avg": tokens, "tokens_kv": tokens, "evidence_recall": budget,
                       "flops_total": 1e8 + 1e6 * tokens, "latency_vision_ms": 10.0, "latency_scorer_ms": 1.0,
                       "latency_prefill_ms": 20 + 0.5 * tokens, "latency_decode_ms_per_token": 2.0,
                       "latency_e2e_ms": 40 + 0.5 * tokens, "latency_none_e2e_ms": 40 + 0.5 * 144, "device": "cpu",
                       # five timed repeats, each over its paired none run, spread about the ratio; cores to itself
                       "latency_ratio_runs": [(40 + 0.5 * tokens) / (40 + 0.5 * 144) * s for s in RUN_SPREAD],
                       "latency_cpu_share": 1.0, **SYNTHETIC_IDENTITY}
                ids = [f"{task.removeprefix('gripbench_')}-test-{i}" for i in range(n)]
                samples = pd.DataFrame({"sample_id": ids, "score": score, "unit": ids, "stratum": "", "prediction": "x",
                                        "target": "x",
                                        "kept_indices": [list(range(int(tokens)))] * n})
                if edit is not None:
                    row, samples = edit(row, samples)
                store.add(row, samples)
    return folder
