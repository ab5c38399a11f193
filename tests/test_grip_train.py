"""Scorer training runs end to end on a tiny random llava-hf-style checkpoint."""

from __future__ import annotations

import json

import torch

from gripbench.engine import Engine
from gripbench.grip.method import load_scorer
from gripbench.grip.train import ScorerTrainConfig, attention_importance, train_dynamicvit, train_grpo, train_warmup


def test_warmup_grpo_dynamicvit_few_steps(tiny_hf, tmp_path):
    engine = Engine(*tiny_hf)
    cfg = ScorerTrainConfig(batch=4, warmup_steps=2, grpo_steps=2, dynamicvit_steps=2, group=4, val_every=2,
                            val_per_task=1)
    warm = train_warmup(engine, cfg, tmp_path, log=lambda *_: None)
    grip = train_grpo(engine, cfg, tmp_path, warm, log=lambda *_: None)
    train_dynamicvit(engine, cfg, tmp_path, log=lambda *_: None)
    for name in ("grip-warmup", "grip", "dynamicvit"):
        scorer = load_scorer(str(tmp_path / f"{name}.safetensors"))
        assert scorer.dim == engine.info.hidden_size
    grpo = [json.loads(x) for x in (tmp_path / "grpo_log.jsonl").read_text().splitlines()]
    assert len(grpo) == 2 and {"reward", "kl", "entropy", "acc@0.25"} <= set(grpo[-1])
    assert all(r["kl"] >= 0 for r in grpo)
    # the warm-up trained: its weights left their initialisation
    from gripbench.grip.scorer import BudgetAwareScorer

    torch.manual_seed(cfg.seed)
    fresh = BudgetAwareScorer(engine.info.hidden_size, cfg.width)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), warm.state_dict().values()))
    # a random model answers nothing right, so every episode of a group earns the same reward,
    # every advantage is zero and GRPO leaves the policy where it was
    if all(r["reward"] == grpo[0]["reward"] for r in grpo):
        assert all(torch.equal(a, b) for a, b in zip(warm.state_dict().values(), grip.state_dict().values()))


def test_attention_importance_is_a_distribution(tiny_hf, samples):
    engine = Engine(*tiny_hf)
    batch = engine.prepare([s.image for s in samples[:3]], [s.question for s in samples[:3]])
    target = attention_importance(engine, batch, engine.vision(batch["pixel_values"]))
    assert target.shape == (3, engine.info.num_visual_tokens)
    assert torch.allclose(target.sum(-1), torch.ones(3)) and (target >= 0).all()
