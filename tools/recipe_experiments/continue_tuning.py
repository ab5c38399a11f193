# ruff: noqa: E401, E402, E501, E701, E702, E731  (kept as run, to reproduce the figures quoted from it)
"""Continue question-only instruction tuning from a saved candidate (/work/scratch/cand1 of grounding.py --save): LR and steps from argv."""
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from gripbench.tasks.suite import TASKS, extra_questions, load_split, make_sample
from gripbench.zoo import build as B

torch.set_num_threads(2)
lr, steps = float(sys.argv[1]), int(sys.argv[2])
cfg = B.BuildConfig(); recipe = B.RECIPES["llava"](cfg)
model = AutoModelForImageTextToText.from_pretrained("/work/scratch/cand1", dtype=torch.float32)
recipe.processor.tokenizer = recipe.tok
model.model.vision_tower.requires_grad_(False)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: B.cosine_lr(s, steps, 10))
tasks = list(TASKS); val = {t: load_split(t, "val", 50) for t in TASKS}; t0 = time.time(); model.train()
for step in range(steps):
    first = 5_000_000 + step * 24
    ss = [make_sample(tasks[(first + j) % 5], "train", first + j) for j in range(24)]
    extra = [extra_questions(s, 4, 0) for s in ss]
    b = recipe.encode(ss, [s.question for s in ss], [s.answer for s in ss], extra)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = model(**{k: v for k, v in b.items() if k != "labels"})
    loss = F.cross_entropy(o.logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if (step + 1) % 25 == 0: print(f"step {step+1} {time.time()-t0:.0f}s loss {loss.item():.3f}", flush=True)
v = B.val_accuracy(model, recipe.processor, val)
print("VAL " + "  ".join(f"{k} {x:.0%}" for k, x in v.items()), flush=True)
