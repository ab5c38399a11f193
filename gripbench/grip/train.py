"""Training the scorers: supervised warm-up, GRPO (GRIP), and the DynamicViT relaxation.

The VLM is frozen throughout; only the scorer learns. Every run is reproducible under a
seed (data, budgets, Gumbel noise) and logs one JSON line per step (reward, KL, entropy,
losses, validation accuracy) for the report.

Warm-up target (why this one): the attention mass that the position generating the
answer puts on each visual token, averaged over all LLM layers and heads of the
*unpruned* model. It is free (one forward pass), derived from the model rather than from
ground-truth evidence (which no method may read), and it is exactly the in-LLM signal
that FastV-style methods use, so the warm-up scorer learns to predict, before the LLM
and from the question alone, which tokens the LLM will look at. A listwise loss
(ListNet: cross-entropy between the target distribution and softmax of the logits) fits
the ranking, which is all top-k deployment uses.

GRPO reward (why this one): r = 1[greedy answer correct] + 0.5 * clip((log p(answer) + 5) / 5, 0, 1),
from the frozen VLM run on the kept tokens (pruned before the LLM, original positions).
Correctness is the objective; the log-likelihood term is dense, so groups in which every
episode is right (or wrong) still rank their episodes. On the embedded suite correctness is
teacher-forced (greedy decoding would emit exactly the answer); on other data
(gripbench/grip/data.py) it is the data's own score of the episode's greedy *generated*
answer: an lmms-eval task's headline per-sample metric after its filters (soft scores such
as TextVQA's are kept as they are), else normalised exact match. The dense term is the same
everywhere, with the reference answer (the most common one when a task lists several).

Each saved scorer records its provenance (model, data, config, steps, seed, validation
figures, gripbench version) in the file's metadata; see gripbench/grip/method.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import gripbench
from gripbench.engine import Engine
from gripbench.errors import GripbenchError
from gripbench.grip.data import EmbeddedData, TrainingData
from gripbench.grip.method import model_record, save_scorer
from gripbench.grip.policy import group_advantages, grpo_loss, gumbel_top_k, plackett_luce_log_prob
from gripbench.grip.scorer import BudgetAwareScorer
from gripbench.methods import PrunePoint, PruningMethod, Selection, keep_count


@dataclass
class ScorerTrainConfig:
    seed: int = 0
    width: int = 64
    batch: int = 16               # prompts per step
    lr: float = 2e-3
    warmup_steps: int = 300
    grpo_steps: int = 400
    group: int = 8                # G episodes per (image, question, rho)
    clip: float = 0.2
    beta: float = 0.04            # k3 KL weight to the warm-up policy
    inner: int = 2                # policy updates per GRPO batch
    rho_min: float = 0.03
    rho_max: float = 0.75
    dynamicvit_steps: int = 400
    tau: float = 1.0              # Gumbel-softmax temperature
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    val_every: int = 100
    val_per_task: int = 60        # embedded suite: validation questions per task
    val_samples: int = 300        # other data: at most this many held-out samples ...
    val_fraction: float = 0.2     # ... and at most this fraction of the data
    val_budgets: tuple[float, ...] = (0.25, 0.0625)


class FixedKeep(PruningMethod):
    """(internal) keep given visual indices [B, k] before the LLM."""

    name = "fixed-keep"

    def __init__(self, keep: torch.Tensor):
        super().__init__(budget=1.0)
        self.keep = keep

    def plan(self, info):
        return [PrunePoint(0, self.keep.shape[1])]

    def select(self, ctx, point):
        return Selection(ctx.visual_ids.gather(1, self.keep))


class AttentionProbe(PruningMethod):
    """(internal) keeps everything; records the last position's attention over visual tokens
    at every LLM layer (mean over heads)."""

    name = "attention-probe"

    def plan(self, info):
        self.rows = []
        return [PrunePoint(layer, info.num_visual_tokens) for layer in range(1, info.num_layers)]

    def select(self, ctx, point):
        b, t = ctx.key_mask.shape
        last = torch.full((b, 1), t - 1, dtype=torch.long, device=ctx.key_mask.device)
        layers = [point.layer - 1] + ([point.layer] if point.layer == ctx.info.num_layers - 1 else [])
        for layer in layers:
            probs = ctx.attention(last, layer=layer).mean(1)[:, 0]  # [B, T]
            self.rows.append(probs.gather(1, ctx.visual_slots))
        return Selection(ctx.visual_ids)


def attention_importance(engine: Engine, batch: dict, vision) -> torch.Tensor:
    """[B, N] warm-up target: answer-position attention on visual tokens, mean over layers
    and heads, normalised to sum to 1 per row."""
    probe = AttentionProbe(budget=1.0)
    with torch.no_grad():
        engine.prefill(batch, probe, vision)
    mass = torch.stack(probe.rows).mean(0)
    return mass / mass.sum(-1, keepdim=True)


def answer_targets(engine: Engine, answers: list[str]) -> torch.Tensor:
    """[B, L] answer token ids + EOS, padded with -100."""
    tok = engine.processor.tokenizer
    ids = [tok(a, add_special_tokens=False).input_ids + [engine.eos_id] for a in answers]
    width = max(len(i) for i in ids)
    return torch.tensor([i + [-100] * (width - len(i)) for i in ids], device=engine.device)


class Trainer:
    """Shared machinery: data, scorer inputs, validation, logging, provenance."""

    def __init__(self, engine: Engine, cfg: ScorerTrainConfig, out: Path, log=print, data: TrainingData | None = None):
        self.engine, self.cfg, self.out, self.log = engine, cfg, Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.index = 0
        self.data = data if data is not None else EmbeddedData(cfg.seed, cfg.val_per_task)
        self.last_val: dict[str, float] = {}
        self.start = time.perf_counter()
        self.log(self.data.summary())

    @property
    def val(self) -> list:
        return self.data.validation()

    def next_samples(self, n: int):
        out = self.data.train_batch(self.index, n)
        self.index += n
        return out

    def inputs(self, samples):
        """(batch, vision, features [B,N,D], question [B,T,D], question mask [B,T])."""
        e = self.engine
        batch = e.prepare([s.image for s in samples], [s.question for s in samples])
        with torch.no_grad():
            vision = e.vision(batch)
            try:
                ctx = e.context(batch, vision)
            except ValueError:
                raise GripbenchError("scorer training needs the images of a batch to give one visual-token layout; this "
                                     "model's token count follows the image size: resize the training images to one size"
                                     ) from None
            q, qm = ctx.question_embeddings()
        return batch, vision, ctx.vision.features.detach(), q.detach(), qm

    def sample_rho(self, n: int) -> torch.Tensor:
        lo, hi = math.log(self.cfg.rho_min), math.log(self.cfg.rho_max)
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=self.gen))

    def validate(self, scorer: BudgetAwareScorer) -> dict[str, float]:
        """The data's validation score of top-k of the scorer at the validation budgets (the
        embedded suite: macro accuracy over its five tasks)."""
        from gripbench.grip.method import ScorerMethod

        class Current(ScorerMethod):
            def scorer_model(self, dim):
                return scorer

        scorer.eval()
        out = self.data.validate(self.engine, lambda rho: Current(budget=rho), self.cfg.val_budgets)
        scorer.train()
        self.last_val = {k: round(v, 4) for k, v in out.items()}
        return out

    def record(self, f, rec: dict, total: int, scorer: BudgetAwareScorer) -> None:
        """Validate every `val_every` steps and at the end, then append the step's JSON line."""
        if rec["step"] % self.cfg.val_every == 0 or rec["step"] == total:
            rec.update(self.validate(scorer))
            self.log(json.dumps(rec))
        f.write(json.dumps(rec) + "\n")
        f.flush()

    def save(self, scorer: BudgetAwareScorer, name: str, steps: int, extra: dict | None = None) -> Path:
        """Write the scorer with its provenance (gripbench/grip/method.py's docstring)."""
        meta = {"method": name, "format": 2, "config": asdict(self.cfg),
                "model": model_record(self.engine.model, self.engine.info.hidden_size),
                "data": self.data.describe(),
                "training": {"steps": steps, "seed": self.cfg.seed, "elapsed_s": round(time.perf_counter() - self.start, 1),
                             "device": str(self.engine.device), **(extra or {})},
                "validation": self.last_val, "gripbench_version": gripbench.__version__}
        path = self.out / f"{name}.safetensors"
        save_scorer(scorer, path, meta)
        return path


def train_warmup(engine: Engine, cfg: ScorerTrainConfig, out: Path, log=print,
                 data: TrainingData | None = None) -> BudgetAwareScorer:
    """ListNet fit of the attention-importance target; saves grip-warmup.safetensors."""
    torch.manual_seed(cfg.seed)
    tr = Trainer(engine, cfg, out, log, data)
    scorer = BudgetAwareScorer(engine.info.hidden_size, cfg.width)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=0.01)
    start = time.perf_counter()
    with open(tr.out / "warmup_log.jsonl", "w") as f:
        for step in range(cfg.warmup_steps):
            samples = tr.next_samples(cfg.batch)
            batch, vision, feats, q, qm = tr.inputs(samples)
            target = attention_importance(engine, batch, vision)
            logits = scorer(feats, q, qm, tr.sample_rho(len(samples)), engine.info.grid)
            loss = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec = {"phase": "warmup", "step": step + 1, "loss": round(loss.item(), 4),
                   "elapsed_s": round(time.perf_counter() - start, 1)}
            tr.record(f, rec, cfg.warmup_steps, scorer)
    tr.save(scorer, "grip-warmup", cfg.warmup_steps)
    return scorer


def train_grpo(engine: Engine, cfg: ScorerTrainConfig, out: Path, reference: BudgetAwareScorer, log=print,
               data: TrainingData | None = None, reference_meta: dict | None = None) -> BudgetAwareScorer:
    """GRPO from the warm-up policy; saves grip.safetensors. `reference_meta`: the warm-up
    file's metadata, summarised in the saved scorer's provenance."""
    torch.manual_seed(cfg.seed + 1)
    tr = Trainer(engine, cfg, out, log, data)
    scorer = BudgetAwareScorer(reference.dim, reference.width)
    scorer.load_state_dict(reference.state_dict())
    reference.eval()
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr * 0.25, weight_decay=0.0)
    n, g = engine.info.num_visual_tokens, cfg.group
    start = time.perf_counter()
    with open(tr.out / "grpo_log.jsonl", "w") as f:
        for step in range(cfg.grpo_steps):
            samples = tr.next_samples(cfg.batch)
            batch, vision, feats, q, qm = tr.inputs(samples)
            rho = float(tr.sample_rho(1))  # one budget per step: every episode of a batch keeps k tokens
            k = keep_count(rho, n)
            rhos = torch.full((len(samples),), rho)
            with torch.no_grad():
                old = scorer(feats, q, qm, rhos, engine.info.grid)
                ref = reference(feats, q, qm, rhos, engine.info.grid)
                orders = gumbel_top_k(old[:, None, :].expand(-1, g, -1), k, tr.gen)  # [P, G, k]
                rewards, correct = episode_scores(engine, batch, vision, samples, orders, tr.data)
            adv = group_advantages(rewards)
            logp_old = plackett_luce_log_prob(old[:, None].expand(-1, g, -1), orders)
            logp_ref = plackett_luce_log_prob(ref[:, None].expand(-1, g, -1), orders)
            for _ in range(cfg.inner):
                logits = scorer(feats, q, qm, rhos, engine.info.grid)
                logp = plackett_luce_log_prob(logits[:, None].expand(-1, g, -1), orders)
                loss, stats = grpo_loss(logp, logp_old, logp_ref, adv, cfg.clip, cfg.beta)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
                opt.step()
            probs = torch.softmax(old, -1)
            rec = {"phase": "grpo", "step": step + 1, "rho": round(rho, 4), "reward": round(rewards.mean().item(), 4),
                   "accuracy": round(correct.mean().item(), 4), "kl": round(stats["kl"], 5),
                   "entropy": round(-(probs * torch.log(probs + 1e-12)).sum(-1).mean().item(), 4),
                   "loss": round(loss.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
            tr.record(f, rec, cfg.grpo_steps, scorer)
    ref = None
    if reference_meta is not None:
        ref = {k: reference_meta.get(k) for k in ("method", "data", "training", "validation")}
    tr.save(scorer, "grip", cfg.grpo_steps, {"reference": ref})
    return scorer


def episode_scores(engine: Engine, batch: dict, vision, samples, orders: torch.Tensor,
                   data: TrainingData | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([P, G] rewards, [P, G] correctness in [0, 1]) of the kept sets `orders` [P, G, k] from
    the frozen VLM: correctness + 0.5 * the dense log-likelihood term of the reference answer.
    Correctness is teacher-forced exact match when the data has no answer score of its own
    (the embedded suite), else the data's score of the greedy generated answer."""
    p, g, k = orders.shape
    rows = torch.arange(p).repeat_interleave(g)
    big = {key: val[rows] for key, val in batch.items()}
    keep = orders.reshape(p * g, k).sort(-1).values
    vis = [vision[r] for r in rows.tolist()]
    targets = answer_targets(engine, [s.answer for s in samples])[rows]
    logp, correct, _ = engine.score(big, FixedKeep(keep), targets, vis)
    dense = ((logp + 5) / 5).clamp(0, 1)
    if data is not None and data.generative:
        texts = greedy_texts(engine, big, keep, vis, targets, correct, data.max_new_tokens)
        correct = torch.tensor([data.score(samples[r], data.truncate(t)) for r, t in zip(rows.tolist(), texts)],
                               dtype=torch.float, device=dense.device)
    return (correct.float() + 0.5 * dense).view(p, g), correct.float().view(p, g)


def greedy_texts(engine: Engine, batch: dict, keep: torch.Tensor, vision, targets: torch.Tensor,
                 forced_correct: torch.Tensor, max_new_tokens: int) -> list[str]:
    """What greedy decoding of each row generates, at most `max_new_tokens` tokens. A row whose
    teacher-forced pass already showed that greedy decoding emits exactly its target (+ EOS)
    generates that target, so only the other rows are decoded (most rows, once the scorer is
    good: this halves the cost of a GRPO step)."""
    texts: list[str | None] = [None] * keep.shape[0]
    for i in forced_correct.nonzero()[:, 0].tolist():
        seq = [t for t in targets[i].tolist() if t >= 0][:max_new_tokens]
        texts[i] = engine.processor.batch_decode([seq], skip_special_tokens=True)[0]
    todo = [i for i, t in enumerate(texts) if t is None]
    if todo:
        sub = {key: val[todo] for key, val in batch.items()}
        gen = engine.generate(sub, FixedKeep(keep[todo]), max_new_tokens=max_new_tokens, vision=[vision[i] for i in todo])
        for i, text in zip(todo, gen.texts):
            texts[i] = text
    return texts


def episode_rewards(engine: Engine, batch: dict, vision, samples, orders: torch.Tensor,
                    data: TrainingData | None = None) -> torch.Tensor:
    """[P, G] rewards of the kept sets `orders` [P, G, k] (see `episode_scores`)."""
    return episode_scores(engine, batch, vision, samples, orders, data)[0]


def train_dynamicvit(engine: Engine, cfg: ScorerTrainConfig, out: Path, log=print,
                     data: TrainingData | None = None) -> BudgetAwareScorer:
    """DynamicViT-style relaxation: Gumbel-sigmoid keep decisions, straight-through, applied
    as log-masks on the visual keys of every layer (attention re-normalised over kept keys),
    task loss + distillation to the unpruned answer distribution + ratio loss to rho."""
    torch.manual_seed(cfg.seed + 2)
    tr = Trainer(engine, cfg, out, log, data)
    scorer = BudgetAwareScorer(engine.info.hidden_size, cfg.width)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=0.01)
    for p in engine.model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    with open(tr.out / "dynamicvit_log.jsonl", "w") as f:
        for step in range(cfg.dynamicvit_steps):
            samples = tr.next_samples(cfg.batch)
            batch, vision, feats, q, qm = tr.inputs(samples)
            rho = tr.sample_rho(len(samples))
            targets = answer_targets(engine, [s.answer for s in samples])
            with torch.no_grad():
                _, _, teacher = engine.score(batch, None, targets, vision)
            logits = scorer(feats, q, qm, rho, engine.info.grid)
            u = torch.rand(logits.shape, generator=tr.gen).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
            soft = torch.sigmoid((logits + noise) / cfg.tau)
            hard = (soft > 0.5).float()
            keep = hard + soft - soft.detach()
            logp, correct, first = engine.score(batch, None, targets, vision, key_bias=torch.log(keep + 1e-6))
            task = -logp.mean()
            distill = torch.nn.functional.kl_div(torch.log_softmax(first.float(), -1), torch.log_softmax(teacher.float(), -1),
                                                 log_target=True, reduction="batchmean")
            ratio = ((keep.mean(-1) - rho) ** 2).mean()
            loss = task + cfg.distill_weight * distill + cfg.ratio_weight * ratio
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
            opt.step()
            rec = {"phase": "dynamicvit", "step": step + 1, "loss": round(loss.item(), 4), "task": round(task.item(), 4),
                   "distill": round(distill.item(), 4), "ratio": round(ratio.item(), 5),
                   "keep_rate": round(hard.mean().item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
            tr.record(f, rec, cfg.dynamicvit_steps, scorer)
    tr.save(scorer, "dynamicvit", cfg.dynamicvit_steps)
    return scorer
