"""Pretraining the parts of an embedded VLM the way real ones are pretrained, at toy scale.

1. **Vision tower, contrastively** (CLIP, Radford et al. 2021): a stock `CLIPModel` (the
   tower the VLM will use, plus a small text encoder) trained with CLIP's symmetric
   in-batch InfoNCE loss on (scene, caption) pairs. This is what makes a real tower's
   [CLS] attention a saliency signal: the [CLS] embedding must tell this scene's caption
   from the other captions of the batch, so it learns to attend to the objects. The text
   encoder is thrown away; the tower is then frozen for the VLM stages, as LLaVA does.
2. **LLM, as a language model** on text about scenes: a caption followed by questions
   about it and their answers, next-token loss on every token. It learns the language and
   to answer from a description before it ever sees an image (a real LLM knows language
   and reasoning before visual instruction tuning).

Both are pure functions of the seed (data order, init). Nothing here reads evidence
patches or attention: no loss favours any pruning signal.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from gripbench.tasks.suite import TASKS, extra_questions, make_sample
from gripbench.zoo.captions import caption

PRETRAIN_SEED_OFFSET = 20_000_000  # pretraining scenes: indices disjoint from the LLaVA stages' (held-out scenes excluded)


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    return min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def scenes(step: int, batch: int, seed: int, offset: int = PRETRAIN_SEED_OFFSET) -> list:
    """The training samples of one pretraining step (scenes of every task family in turn)."""
    tasks = list(TASKS)
    first = offset + step * batch
    return [make_sample(tasks[(first + j) % len(tasks)], "train", first + j, base_seed=seed) for j in range(batch)]


def _text_config(tokenizer, layers: int, dim: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          projection_dim=projection_dim)


def build_clip(tokenizer, vision_config, text_layers: int = 3, text_dim: int = 128, projection_dim: int = 128, seed: int = 0):
    """A stock CLIPModel: the VLM's vision tower config and a small text encoder over the
    embedded tokenizer (pooled at its end-of-text token)."""
    from transformers import CLIPConfig, CLIPModel

    text = _text_config(tokenizer, text_layers, text_dim, projection_dim)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision_config.to_dict(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    return CLIPModel(cfg)


def pretrain_vision(clip, recipe, steps: int, batch: int, lr: float, seed: int, log=print, bf16: bool = True) -> list[dict]:
    """CLIP's contrastive pretraining on (scene, caption) pairs, in-batch negatives; each
    caption lists the items in a random order (text augmentation). `clip` takes
    input_ids, attention_mask, the recipe's `clip_inputs(images)` and `return_loss` like a
    stock CLIPModel. Returns the log."""
    tok = recipe.tok
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    # a tenth of the steps to warm up: a faster warm-up (a twentieth of 250) stalled at chance for the first 100 steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 10)))
    rng = np.random.default_rng(seed)
    start, records = time.perf_counter(), []
    clip.train()
    for step in range(steps):
        samples = scenes(step, batch, seed)
        texts = [caption(s.scene, rng) + tok.eos_token for s in samples]
        enc = tok(texts, padding=True, return_tensors="pt", padding_side="right")
        vision = recipe.clip_inputs([s.image for s in samples])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **vision, return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            hit = (out.logits_per_image.argmax(-1) == torch.arange(batch)).float().mean().item()
        rec = {"stage": "vision", "step": step + 1, "loss": round(out.loss.item(), 4), "in_batch_top1": round(hit, 3),
               "elapsed_s": round(time.perf_counter() - start, 1)}
        records.append(rec)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log(f"clip step {step + 1}/{steps}  {rec['elapsed_s']:.0f}s  loss {rec['loss']:.3f}  "
                f"image->caption top-1 in batch of {batch}: {hit:.1%}")
    return records


def lm_text(sample, chat, turns: int, seed: int) -> str:
    """A caption, then questions about the scene and their answers, in the model's chat
    format (`chat(question, answer)` renders one turn)."""
    qa = [(sample.question, sample.answer)] + [(q, a) for q, a, _ in extra_questions(sample, turns, seed)]
    return caption(sample.scene) + " " + "".join(chat(q, a) for q, a in qa)


def pretrain_llm(llm, tokenizer, chat, steps: int, batch: int, lr: float, seed: int, turns: int = 4, log=print,
                 bf16: bool = True) -> list[dict]:
    """Next-token pretraining of the LLM (a stock causal LM) on `lm_text`."""
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    start, records = time.perf_counter(), []
    llm.train()
    for step in range(steps):
        samples = scenes(step, batch, seed, offset=PRETRAIN_SEED_OFFSET + 5_000_000)
        enc = tokenizer([lm_text(s, chat, turns, seed) for s in samples], padding=True, return_tensors="pt", padding_side="right")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = llm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        sched.step()
        rec = {"stage": "llm", "step": step + 1, "loss": round(out.loss.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
        records.append(rec)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log(f"lm step {step + 1}/{steps}  {rec['elapsed_s']:.0f}s  loss {rec['loss']:.3f}")
    return records
