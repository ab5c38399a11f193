# ruff: noqa: E402, E501, E701, E702, E731  (kept as run, to reproduce the figures quoted from it)
"""Recipe experiments of issue 6/7 (not part of the package or the tests): does the LLM
read the image? Reuses the build's pretraining stages (cached under /work/scratch/exp-FAMILY
by `gripbench.zoo.build._stage`), then runs alignment and instruction tuning with the
variants on the command line and prints, besides the losses, the caption loss with the
right image against another scene's (the gap is what the image contributes) and the
validation accuracy per task. The figures quoted in gripbench/zoo/build.py and in
docs/build-llava-pilot2.log come from here, e.g.

    python tools/recipe_experiments/grounding.py --threads 1 --align-steps 120 --tune-steps 0          # LLM frozen
    python tools/recipe_experiments/grounding.py --align-steps 400 --align-llm --align-lr 2e-3 \
        --tune-steps 500 --tune-lr 1e-3 --tune-describe --eval-every 250 --save /tmp/cand
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gripbench.tasks.suite import TASKS, extra_questions, load_split, make_sample
from gripbench.zoo import build as B
from gripbench.zoo.captions import caption

ap = argparse.ArgumentParser()
ap.add_argument("--family", default="llava")
ap.add_argument("--stop-after-pretrain", action="store_true")
ap.add_argument("--proj-scale", type=float, default=1.0)
ap.add_argument("--align-steps", type=int, default=100)
ap.add_argument("--align-lr", type=float, default=2e-3)
ap.add_argument("--align-llm", action="store_true")
ap.add_argument("--tune-steps", type=int, default=300)
ap.add_argument("--tune-lr", type=float, default=5e-4)
ap.add_argument("--tower-lr", type=float, default=0.0)
ap.add_argument("--eval-every", type=int, default=100)
ap.add_argument("--tune-describe", action="store_true")
ap.add_argument("--save")
ap.add_argument("--aux", type=float, default=0.0)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
log = lambda m: print(m, flush=True)
cfg = B.BuildConfig(family=a.family, align_steps=a.align_steps, align_lr=a.align_lr, tune_steps=a.tune_steps, tune_lr=a.tune_lr,
                    eval_every=a.eval_every, eval_per_task=50)
out = Path(f"/work/scratch/exp-{a.family}")
recipe = B.RECIPES[cfg.family](cfg); tok = recipe.tok
model = recipe.model(); records, minutes = [], {}
def vision_stage():
    clip, copy_back = recipe.contrastive(model)
    recs = B.pretrain_vision(clip, recipe, cfg.clip_steps, cfg.clip_batch, cfg.clip_lr, cfg.seed, log, cfg.bf16)
    copy_back(); return recipe.tower(model).state_dict(), recs
state = B._stage(out, "vision_pretraining", B.VISION_FIELDS, cfg, vision_stage, records, minutes, log)
recipe.tower(model).load_state_dict(state)
def llm_stage():
    torch.manual_seed(cfg.seed + 1); llm = recipe.causal_lm()
    recs = B.pretrain_llm(llm, tok, recipe.lm_chat, cfg.lm_steps, cfg.lm_batch, cfg.lm_lr, cfg.seed, cfg.extra_turns, log, cfg.bf16)
    return llm.state_dict(), recs
state = B._stage(out, "llm_pretraining", B.LLM_FIELDS, cfg, llm_stage, records, minutes, log)
model.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
model.lm_head.load_state_dict({"weight": state["lm_head.weight"]})
if a.stop_after_pretrain: sys.exit(0)

proj = recipe.projector(model)
if a.proj_scale != 1.0:
    last = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(a.proj_scale); last.bias.mul_(a.proj_scale) if last.bias is not None else None

tasks = list(TASKS)
def samples(step, batch, offset):
    first = offset + step * batch
    return [make_sample(tasks[(first + j) % len(tasks)], "train", first + j, base_seed=cfg.seed) for j in range(batch)]

def norms():
    ss = samples(0, 8, 77_000_000)
    b = recipe.encode(ss, [B.DESCRIBE] * 8, [caption(s.scene) for s in ss])
    with torch.no_grad():
        emb = model.get_input_embeddings()
        img = model.get_image_features(**{k: v for k, v in b.items() if k in ("pixel_values", "image_grid_thw")})
        img = getattr(img, "pooler_output", img)
        img = torch.cat([i.reshape(-1, i.shape[-1]) for i in img]) if isinstance(img, (list, tuple)) else img
        img = img.reshape(-1, img.shape[-1])
        w = emb.weight.norm(dim=-1).mean().item()
        cos = F.cosine_similarity(img[:, None], img[None, :200], dim=-1).mean().item() if img.shape[0] else 0
    return f"visual token norm {img.norm(dim=-1).mean():.3f} (std over tokens {img.norm(dim=-1).std():.3f}), word norm {w:.3f}, mean pairwise cos {cos:.3f}"

def caption_gap(n=48):
    """answer loss of the caption given the right image vs a shifted (wrong) image"""
    ss = samples(0, n, 88_000_000)
    caps = [caption(s.scene) for s in ss]
    res = []
    model.eval()
    for shift in (0, 1):
        imgs = ss[shift:] + ss[:shift]
        b = recipe.encode(imgs, [B.DESCRIBE] * n, caps)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            o = model(**{k: v for k, v in b.items() if k != "labels"})
        res.append(F.cross_entropy(o.logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100).item())
    model.train()
    return f"caption loss right image {res[0]:.3f}  wrong image {res[1]:.3f}"

log("init: " + norms()); log("init: " + caption_gap())
model.requires_grad_(False)
params = list(proj.parameters())
if a.align_llm: model.model.language_model.requires_grad_(True)
for p in params: p.requires_grad_(True)
params = [p for p in model.parameters() if p.requires_grad]
def align_batch(step):
    ss = samples(step, cfg.align_batch, 30_000_000)
    return recipe.encode(ss, [B.DESCRIBE] * len(ss), [caption(s.scene) for s in ss])
t = time.time()
def aux_loss(b, ss):
    feats = model.get_image_features(pixel_values=b["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    labels = torch.stack([patch_labels(s) for s in ss])
    what = sum(heads._balanced(heads.logits(feats.float(), i).flatten(0, 1), labels[:, i].flatten()) for i in range(3)) / 3
    return what + heads.scale_loss(feats.float())
from gripbench.zoo.train import AuxHeads, patch_labels

heads = AuxHeads(cfg.llm_dim, model.get_input_embeddings(), tok)
params = params + [heads.background, heads.scale]
if cfg.align_steps:
    opt = torch.optim.AdamW(params, lr=cfg.align_lr, betas=(0.9, 0.98), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: B.cosine_lr(s, cfg.align_steps, max(1, cfg.align_steps // 20)))
    model.train(); t0 = time.time()
    for step in range(cfg.align_steps):
        ss = samples(step, cfg.align_batch, 30_000_000)
        b = recipe.encode(ss, [B.DESCRIBE] * len(ss), [caption(s.scene) for s in ss])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = model(**{k: v for k, v in b.items() if k != "labels"})
            loss = F.cross_entropy(o.logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
            al = aux_loss(b, ss) if a.aux else torch.zeros(())
        opt.zero_grad(set_to_none=True); (loss + a.aux * al).backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
        if (step + 1) % 25 == 0:
            log(f"align {step+1} {time.time()-t0:.0f}s loss {loss.item():.3f} aux {al.item():.3f}")
        if (step + 1) % 80 == 0:
            log("  " + caption_gap())

log(f"after align ({time.time()-t:.0f}s): " + norms()); log("after align: " + caption_gap())
val = {t: load_split(t, "val", 50) for t in TASKS}
model.model.language_model.requires_grad_(True)
groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.tune_lr}]
if a.tower_lr:
    recipe.tower(model).requires_grad_(True)
    groups.append({"params": list(recipe.tower(model).parameters()), "lr": a.tower_lr})
def tune_batch(step):
    ss = samples(step, cfg.tune_batch, 0)
    extra = [extra_questions(s, cfg.extra_turns, cfg.seed) for s in ss]
    if a.tune_describe:
        extra = [e[:-1] + [(B.DESCRIBE, caption(s.scene), None)] for e, s in zip(extra, ss)]
    return recipe.encode(ss, [s.question for s in ss], [s.answer for s in ss], extra)
# _train_stage with param groups: reimplement minimal loop
opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.05)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: B.cosine_lr(s, cfg.tune_steps, max(1, cfg.tune_steps // 20)))
allp = [p for g in groups for p in g["params"]]
t = time.time(); model.train()
for step in range(cfg.tune_steps):
    b = tune_batch(step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = model(**{k: v for k, v in b.items() if k != "labels"})
    loss = F.cross_entropy(o.logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(allp, 1.0); opt.step(); sched.step()
    if (step + 1) % 25 == 0: log(f"tune {step+1} {time.time()-t:.0f}s loss {loss.item():.3f}")
    if (step + 1) % a.eval_every == 0:
        v = B.val_accuracy(model, recipe.processor, val)
        log(f"tune {step+1} VAL " + "  ".join(f"{k} {x:.0%}" for k, x in v.items()) + "  | " + caption_gap())
if a.save:
    from gripbench.zoo.train import save_checkpoint
    save_checkpoint(model, recipe.processor, a.save)
    log(f"saved to {a.save}")
