"""Train the embedded tiny LLaVA from scratch on the procedural task suite (CPU, minutes).

Objective. Cross-entropy on the answer tokens (the answer word and `</s>`), the same
loss as LLaVA's visual instruction tuning, plus a *dense auxiliary loss* during
training only: three linear heads read each visual token at the projector output and
predict the colour, shape and character of the item covering that patch. The heads
are thrown away; the shipped checkpoint is the plain `LlavaForConditionalGeneration`.

Why the auxiliary loss: (1) a 6 M-parameter CLIP learns shapes and glyphs from an
answer-only signal far too slowly for a 2-core CPU budget; (2) it keeps visual tokens
*local* (each one describes its own patch), like the patch features of a CLIP trained at
scale, so that which tokens survive pruning decides what the LLM can still see. It
says nothing about which tokens to keep, so it favours no pruning method.

Determinism: model init and batch composition are pure functions of the seed; the
training sample at global position i is `make_sample(task, "train", i, base_seed=seed)`,
never a test or validation scene (`is_held_out`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gripbench.tasks.scenes import CHARS, COLORS, SHAPES
from gripbench.tasks.suite import TASKS, Sample, load_split, make_sample
from gripbench.zoo.model import build_model, build_processor, prompt_text


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    aux_weight: float = 0.5
    eval_every: int = 250
    eval_per_task: int = 100
    curriculum: float = 0.0  # share of steps over which scenes grow from 1-2 shapes to 3-6
    init_range: float = 0.02
    seed: int = 0

    def max_shapes(self, step: int) -> int:
        if self.curriculum <= 0 or step >= self.curriculum * self.steps:
            return 6
        return 2 + int(5 * step / (self.curriculum * self.steps))


def patch_labels(sample: Sample) -> torch.Tensor:
    """[3, num_patches] long: colour, shape (sign = last class) and character of the item
    holding the most pixels of each patch (0 = background)."""
    scene = sample.scene
    cfg = scene.config
    g, p = cfg.grid, cfg.patch_size
    best = np.zeros(cfg.num_patches)
    labels = np.zeros((3, cfg.num_patches), dtype=np.int64)
    for it in scene.items:
        counts = scene.mask(it).reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
        win = (counts >= cfg.min_patch_pixels) & (counts > best)
        best = np.where(win, counts, best)
        labels[0, win] = 1 + list(COLORS).index(it.color)
        labels[1, win] = 1 + (SHAPES.index(it.shape) if it.kind == "shape" else len(SHAPES))
        labels[2, win] = 1 + CHARS.index(it.char) if it.kind == "sign" else 0
    return torch.from_numpy(labels)


def encode(processor, samples: list[Sample], with_answers: bool) -> dict[str, torch.Tensor]:
    """Processor inputs; with answers, right-padded with labels on the answer + `</s>` only."""
    texts = [prompt_text(s.question) + (f" {s.answer}</s>" if with_answers else "") for s in samples]
    batch = processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt",
                      padding_side="right" if with_answers else "left")
    if with_answers:
        labels = torch.full_like(batch["input_ids"], -100)
        lengths = batch["attention_mask"].sum(1)
        for row, s in enumerate(samples):
            n = len(processor.tokenizer(f"{s.answer}</s>", add_special_tokens=False).input_ids)
            end = int(lengths[row])
            labels[row, end - n:end] = batch["input_ids"][row, end - n:end]
        batch["labels"] = labels
    return batch


class AuxHeads(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in (len(COLORS) + 1, len(SHAPES) + 2, len(CHARS) + 1))

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(h(feats).flatten(0, 1), labels[:, i].flatten()) for i, h in enumerate(self.heads)) / 3


def training_step(model, heads: AuxHeads, batch: dict, aux: torch.Tensor, aux_weight: float):
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    answer_loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    feats = out.image_hidden_states.view(aux.shape[0], -1, out.image_hidden_states.shape[-1])
    aux_loss = heads.loss(feats, aux)
    return answer_loss + aux_weight * aux_loss, answer_loss.detach(), aux_loss.detach()


@torch.no_grad()
def accuracy(model, processor, samples: list[Sample], batch_size: int = 50) -> float:
    """Greedy exact-match accuracy with the stock `generate` (no pruning)."""
    from gripbench.evaluate import normalize

    model.eval()
    correct = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = encode(processor, chunk, with_answers=False)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        texts = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(normalize(t) == s.answer for t, s in zip(texts, chunk))
    model.train()
    return correct / len(samples)


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    """Train, validate every `eval_every` steps, save an fp16 checkpoint + processor to out_dir."""
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    model = build_model(processor.tokenizer, seed=cfg.seed, init_range=cfg.init_range)
    heads = AuxHeads(model.config.text_config.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    val = {t: load_split(t, "val", cfg.eval_per_task) for t in TASKS}
    tasks = list(TASKS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logf = open(out_dir / "train_log.jsonl", "w")
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        first = step * cfg.batch_size
        samples = [make_sample(tasks[(first + j) % len(tasks)], "train", first + j, base_seed=cfg.seed,
                               max_shapes=cfg.max_shapes(step)) for j in range(cfg.batch_size)]
        batch = encode(processor, samples, with_answers=True)
        aux = torch.stack([patch_labels(s) for s in samples])
        loss, ans, auxl = training_step(model, heads, batch, aux, cfg.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        record = {"step": step + 1, "loss": round(loss.item(), 4), "answer_loss": round(ans.item(), 4),
                  "aux_loss": round(auxl.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["val"] = {t: accuracy(model, processor, s) for t, s in val.items()}
            log(f"step {step + 1}/{cfg.steps}  {record['elapsed_s']:.0f}s  loss {record['answer_loss']:.3f} aux {record['aux_loss']:.3f}  "
                + "  ".join(f"{t} {a:.1%}" for t, a in record["val"].items()))
        elif (step + 1) % 25 == 0:
            log(f"step {step + 1}/{cfg.steps}  {record['elapsed_s']:.0f}s  loss {record['answer_loss']:.3f} aux {record['aux_loss']:.3f}")
        logf.write(json.dumps(record) + "\n")
        logf.flush()
    logf.close()
    model.half().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"elapsed_s": time.perf_counter() - start, "val": record.get("val", {})}
