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
episode is right (or wrong) still rank their episodes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gripbench.engine import Engine
from gripbench.grip.method import save_scorer
from gripbench.grip.policy import group_advantages, grpo_loss, gumbel_top_k, plackett_luce_log_prob
from gripbench.grip.scorer import BudgetAwareScorer
from gripbench.methods import PrunePoint, PruningMethod, Selection, keep_count
from gripbench.tasks.suite import TASKS, load_split, make_sample


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
    val_per_task: int = 60
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
    """Shared machinery: data, scorer inputs, validation, logging."""

    def __init__(self, engine: Engine, cfg: ScorerTrainConfig, out: Path, log=print):
        self.engine, self.cfg, self.out, self.log = engine, cfg, Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.index = 0
        self.val = [s for t in TASKS for s in load_split(t, "val", cfg.val_per_task)]

    def next_samples(self, n: int):
        tasks = list(TASKS)
        out = [make_sample(tasks[(self.index + j) % len(tasks)], "train", self.index + j, base_seed=self.cfg.seed + 101)
               for j in range(n)]
        self.index += n
        return out

    def inputs(self, samples):
        """(batch, vision, features [B,N,D], question [B,T,D], question mask [B,T])."""
        e = self.engine
        batch = e.prepare([s.image for s in samples], [s.question for s in samples])
        with torch.no_grad():
            vision = e.vision(batch["pixel_values"])
            ctx = e.context(batch, vision)
            q, qm = ctx.question_embeddings()
        return batch, vision, vision.features.detach(), q.detach(), qm

    def sample_rho(self, n: int) -> torch.Tensor:
        lo, hi = math.log(self.cfg.rho_min), math.log(self.cfg.rho_max)
        return torch.exp(lo + (hi - lo) * torch.rand(n, generator=self.gen))

    def validate(self, scorer: BudgetAwareScorer) -> dict[str, float]:
        """Macro accuracy of top-k of the scorer at the validation budgets."""
        from gripbench.evaluate import accuracy, run_samples
        from gripbench.grip.method import ScorerMethod

        class Current(ScorerMethod):
            def scorer_model(self, dim):
                return scorer

        out = {}
        scorer.eval()
        for rho in self.cfg.val_budgets:
            res = run_samples(self.engine, self.val, Current(budget=rho), batch_size=64)
            per = {t: accuracy([r for r, s in zip(res, self.val) if s.task == t]) for t in TASKS}
            out[f"acc@{rho:g}"] = sum(per.values()) / len(per)
        scorer.train()
        return out

    def record(self, f, rec: dict, total: int, scorer: BudgetAwareScorer) -> None:
        """Validate every `val_every` steps and at the end, then append the step's JSON line."""
        if rec["step"] % self.cfg.val_every == 0 or rec["step"] == total:
            rec.update(self.validate(scorer))
            self.log(json.dumps(rec))
        f.write(json.dumps(rec) + "\n")
        f.flush()


def train_warmup(engine: Engine, cfg: ScorerTrainConfig, out: Path, log=print) -> BudgetAwareScorer:
    """ListNet fit of the attention-importance target; saves grip-warmup.safetensors."""
    torch.manual_seed(cfg.seed)
    tr = Trainer(engine, cfg, out, log)
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
    save_scorer(scorer, tr.out / "grip-warmup.safetensors", {"method": "grip-warmup", "config": asdict(cfg)})
    return scorer


def train_grpo(engine: Engine, cfg: ScorerTrainConfig, out: Path, reference: BudgetAwareScorer, log=print) -> BudgetAwareScorer:
    """GRPO from the warm-up policy; saves grip.safetensors."""
    torch.manual_seed(cfg.seed + 1)
    tr = Trainer(engine, cfg, out, log)
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
                rewards = episode_rewards(engine, batch, vision, samples, orders)
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
                   "accuracy": round((rewards >= 1).float().mean().item(), 4), "kl": round(stats["kl"], 5),
                   "entropy": round(-(probs * torch.log(probs + 1e-12)).sum(-1).mean().item(), 4),
                   "loss": round(loss.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
            tr.record(f, rec, cfg.grpo_steps, scorer)
    save_scorer(scorer, tr.out / "grip.safetensors", {"method": "grip", "config": asdict(cfg)})
    return scorer


def episode_rewards(engine: Engine, batch: dict, vision, samples, orders: torch.Tensor) -> torch.Tensor:
    """[P, G] rewards of the kept sets `orders` [P, G, k] from the frozen VLM."""
    p, g, k = orders.shape
    rows = torch.arange(p).repeat_interleave(g)
    big = {key: val[rows] for key, val in batch.items()}
    keep = orders.reshape(p * g, k).sort(-1).values
    targets = answer_targets(engine, [s.answer for s in samples])[rows]
    logp, correct, _ = engine.score(big, FixedKeep(keep), targets, vision.select_rows(rows))
    dense = ((logp + 5) / 5).clamp(0, 1)
    return (correct.float() + 0.5 * dense).view(p, g)


def train_dynamicvit(engine: Engine, cfg: ScorerTrainConfig, out: Path, log=print) -> BudgetAwareScorer:
    """DynamicViT-style relaxation: Gumbel-sigmoid keep decisions, straight-through, applied
    as log-masks on the visual keys of every layer (attention re-normalised over kept keys),
    task loss + distillation to the unpruned answer distribution + ratio loss to rho."""
    torch.manual_seed(cfg.seed + 2)
    tr = Trainer(engine, cfg, out, log)
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
    save_scorer(scorer, tr.out / "dynamicvit.safetensors", {"method": "dynamicvit", "config": asdict(cfg)})
    return scorer
