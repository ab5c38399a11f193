# ruff: noqa: E402, E501, E701, E702, E731  (kept as run, to reproduce the figures quoted from it)
"""Linear probes of the contrastively pretrained LLaVA tower's patch features (issue 6/7):
colour, shape and character of the item under each patch, read from hidden layers -2, -1
and 1 (400 training scenes, 200 held out). Needs the cached vision stage of grounding.py."""

import torch
import torch.nn.functional as F

from gripbench.zoo import build as B
from gripbench.zoo.pretrain import scenes
from gripbench.zoo.train import patch_labels

torch.set_num_threads(2)
cfg = B.BuildConfig(); r = B.RECIPES["llava"](cfg); model = r.model()
st = torch.load("/work/scratch/exp-llava/stages/vision_pretraining.pt", weights_only=True)["state"]
tower = r.tower(model); tower.load_state_dict(st); tower.eval()
def feats(ss, layer):
    with torch.no_grad():
        out = tower(**r.vision_inputs([s.image for s in ss]), output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]
for layer in (-2, -1, 1):
    tr = scenes(0, 400, 0, offset=50_000_000); te = scenes(0, 200, 0, offset=60_000_000)
    Xtr, Xte = feats(tr, layer), feats(te, layer)
    Ytr = torch.stack([patch_labels(s) for s in tr]); Yte = torch.stack([patch_labels(s) for s in te])
    mu, sd = Xtr.mean((0, 1)), Xtr.std((0, 1)) + 1e-5
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    res = []
    for k, name in ((0, "color"), (1, "shape"), (2, "char")):
        n = int(max(Ytr[:, k].max(), Yte[:, k].max())) + 1
        W = torch.zeros(Xtr.shape[-1], n, requires_grad=True); b = torch.zeros(n, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=1e-2)
        x, y = Xtr.reshape(-1, Xtr.shape[-1]), Ytr[:, k].reshape(-1)
        for _ in range(300):
            loss = F.cross_entropy(x @ W + b, y); opt.zero_grad(); loss.backward(); opt.step()
        pred = (Xte.reshape(-1, Xte.shape[-1]) @ W + b).argmax(-1); yt = Yte[:, k].reshape(-1)
        fg = yt > 0
        res.append(f"{name} all {(pred == yt).float().mean():.2f} fg {(pred[fg] == yt[fg]).float().mean():.2f} (fg majority {(yt[fg] == yt[fg].mode().values).float().mean():.2f})")
    print("layer", layer, " | ".join(res), flush=True)
