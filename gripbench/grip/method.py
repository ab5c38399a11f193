"""GRIP-VLM and the scorers compared with it, as pruning methods: top-k of a trained scorer
before the LLM.

- `grip`: the scorer after supervised warm-up and GRPO (arXiv 2605.13375, our reading);
- `grip-warmup`: the same scorer after the supervised warm-up only (GRPO's reference policy);
- `dynamicvit`: the same architecture trained end to end through a Gumbel-softmax
  straight-through mask (DynamicViT, arXiv 2106.02034): the continuous-relaxation family.

Each loads its weights from `gripbench/grip/weights/<name>.safetensors` (trained for the
embedded model) or from the parameter `scorer=PATH` (a file written by `gripbench train`). The scorer's
FLOPs and time are the method's own cost.

A scorer file carries its provenance as JSON under the safetensors metadata key `gripbench`:
`dim`, `width`, `method`, `config`, and (files written by `gripbench train` since `--data`)
`format`, `model` {name, identity, fingerprint, hidden_size}, `data` {spec, kind, split,
identity, ...}, `training` {steps, seed, elapsed_s, ...}, `validation` {acc@rho: ...} and
`gripbench_version`. A scorer is only meaningful for the model it was trained on, so using
one with another model is one error line, decided by `model_fingerprint`: a hash of a fixed
strided sample of every parameter, rounded to fp16 so that the same checkpoint loaded in
fp32 (CPU) or fp16 (CUDA) gives the same fingerprint, computed in a few milliseconds even
for a 7B model. (`model_identity`, a hash of the checkpoint's files, is recorded too, but a
method only sees the loaded model, and hashing 15 GB per evaluation is not an option.)
Files without `model` (the shipped weights, untrained test scorers) are not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gripbench.errors import GripbenchError
from gripbench.grip.scorer import BudgetAwareScorer
from gripbench.methods import ModelInfo, PrunePoint, PruningMethod, Selection, keep_count, topk_sorted

WEIGHTS = Path(__file__).parent / "weights"


FINGERPRINT_SAMPLES = 64  # values read per parameter tensor


def save_scorer(scorer: BudgetAwareScorer, path: str | Path, meta: dict | None = None) -> None:
    meta = {"dim": scorer.dim, "width": scorer.width, **(meta or {})}
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(path),
              metadata={"gripbench": json.dumps(meta)})


@lru_cache(maxsize=16)
def _metadata(path: str, stamp: tuple) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {})["gripbench"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError):
        raise GripbenchError(f"{path} is not a scorer written by `gripbench train` (no readable gripbench metadata)") from None


def scorer_metadata(path: str | Path) -> dict:
    """The JSON provenance stored in a scorer file (see the module docstring)."""
    path = str(path)
    if not Path(path).is_file():
        raise GripbenchError(f"no trained scorer at {path}; train one with `gripbench train`")
    st = os.stat(path)
    return _metadata(path, (st.st_size, st.st_mtime_ns))


def load_scorer(path: str) -> BudgetAwareScorer:
    meta = scorer_metadata(path)
    st = os.stat(path)
    return _load(path, (st.st_size, st.st_mtime_ns), meta["dim"], meta["width"])


@lru_cache(maxsize=8)
def _load(path: str, stamp: tuple, dim: int, width: int) -> BudgetAwareScorer:
    scorer = BudgetAwareScorer(dim, width)
    scorer.load_state_dict(load_file(path))
    return scorer.eval()


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> fingerprint; never keeps a model alive


def model_fingerprint(model) -> str:
    """16 hex digits identifying a loaded model's weights: sha256 over every parameter's name,
    shape and FINGERPRINT_SAMPLES evenly strided values rounded to fp16. Equal for the same
    checkpoint in fp32 or fp16, on CPU or GPU; any retraining or fine-tune changes it.
    Cached per model object."""
    cached = _FINGERPRINTS.get(model)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(flat[::step][:FINGERPRINT_SAMPLES].to(torch.float16).cpu().numpy().tobytes())
    _FINGERPRINTS[model] = h.hexdigest()[:16]
    return _FINGERPRINTS[model]


def model_name(model) -> str:
    """How a user names a loaded model on the command line: 'embedded', a folder or a hub id."""
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    try:
        from gripbench.zoo import EMBEDDED_DIR

        if path and Path(path).resolve() == EMBEDDED_DIR.resolve():
            return "embedded"
    except OSError:
        pass
    return str(path) or "an unnamed model"


def model_record(model, hidden_size: int) -> dict:
    """The `model` entry of a scorer's metadata."""
    from gripbench.provenance import model_identity

    name = model_name(model)
    try:
        identity = model_identity(name)
    except Exception:  # noqa: BLE001 - a hub id not in the offline cache: the fingerprint still identifies it
        identity = None
    return {"name": name, "identity": identity, "fingerprint": model_fingerprint(model), "hidden_size": hidden_size}


def check_scorer_model(path: str | Path, model) -> None:
    """One GripbenchError line when the scorer at `path` records a model other than `model`."""
    recorded = scorer_metadata(path).get("model")
    if not isinstance(recorded, dict) or not recorded.get("fingerprint"):
        return  # shipped or hand-made scorers record no model
    if recorded["fingerprint"] == model_fingerprint(model):
        return
    name = model_name(model)
    sha = recorded.get("identity") or recorded["fingerprint"]
    raise GripbenchError(f"the scorer at {path} was trained for model {recorded.get('name')} (sha {sha}, weights "
                         f"fingerprint {recorded['fingerprint']}), not {name} (fingerprint {model_fingerprint(model)}); "
                         f"retrain with `gripbench train {scorer_metadata(path).get('method', 'grip')} --model {name}`")


class ScorerMethod(PruningMethod):
    """Top round(rho*N) visual tokens by a trained scorer's logits, before the LLM."""

    weights = "grip"
    train_command = "grip"  # `gripbench train <this>` writes such a scorer
    accounting = "llm_input"

    scorer: str | None = None  # path of a scorer written by `gripbench train`; None = the shipped weights

    def plan(self, info: ModelInfo) -> list[PrunePoint]:
        return [PrunePoint(0, keep_count(self.budget, info.num_visual_tokens))]

    def scorer_model(self, dim: int) -> BudgetAwareScorer:
        """The trained scorer, read from disk once per method instance (not per batch, which
        would charge file I/O to the method's selection latency)."""
        path = self.scorer or str(WEIGHTS / f"{self.weights}.safetensors")
        cached = getattr(self, "_scorer", None)
        if cached is not None and cached[0] == path:
            scorer = cached[1]
        else:
            scorer = load_scorer(path)
            self._scorer = (path, scorer)
        if scorer.dim != dim:
            raise GripbenchError(f"the scorer at {path} was trained for hidden size {scorer.dim}, the model has {dim}; "
                                 f"train one for this model with `gripbench train {self.train_command} --model ...`")
        return scorer

    def selection_flops(self, info: ModelInfo, text_tokens: int, arch=None) -> float:
        return float(BudgetAwareScorer(info.hidden_size).flops(info.num_visual_tokens, text_tokens))

    def check(self, engine) -> None:
        """The scorer fits the model: its hidden size, and the model it records (if any)."""
        self.scorer_model(engine.adapter.hidden_size)
        if self.scorer is not None:
            check_scorer_model(self.scorer, engine.model)

    def check_model(self, ctx) -> None:
        """A scorer file trained for another model is refused (once per method and model).
        The loaded model is reached through `ctx.adapter.model`: ModelInfo carries no identity."""
        model = getattr(ctx.adapter, "model", None)
        if self.scorer is None or model is None or getattr(self, "_checked_for", None) == (self.scorer, id(model)):
            return
        check_scorer_model(self.scorer, model)
        self._checked_for = (self.scorer, id(model))

    def logits(self, ctx) -> torch.Tensor:
        self.check_model(ctx)
        feats = ctx.visual_features()
        scorer = self.scorer_model(feats.shape[-1]).to(feats.device)
        q, qm = ctx.question_embeddings()
        rho = torch.full((feats.shape[0],), self.budget, device=feats.device)
        with torch.no_grad():
            return scorer(feats, q, qm, rho, ctx.info.grids or None)

    def select(self, ctx, point: PrunePoint) -> Selection:
        logits = self.logits(ctx)
        return Selection(ctx.visual_ids.gather(1, topk_sorted(logits, point.keep)), scores=logits)


class Grip(ScorerMethod):
    """GRIP-VLM: budget-aware scorer trained by GRPO after a supervised warm-up; top-k before the LLM"""

    name = "grip"
    weights = "grip"


class GripWarmup(ScorerMethod):
    """GRIP's scorer after the supervised warm-up only (the RL reference policy)"""

    name = "grip-warmup"
    weights = "grip-warmup"
    train_command = "warmup"


class DynamicViT(ScorerMethod):
    """same scorer trained through a Gumbel-softmax straight-through mask (DynamicViT-style relaxation)"""

    name = "dynamicvit"
    weights = "dynamicvit"
    train_command = "dynamicvit"
