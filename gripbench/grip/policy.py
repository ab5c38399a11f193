"""The Plackett-Luce policy over scorer logits, sampled exactly by Gumbel-top-k, and GRPO.

An episode keeps k = round(rho * N) tokens, one action at a time; the policy picks the
next token with probability softmax(s) over the tokens not chosen yet. The whole ordered
episode is therefore a Plackett-Luce sample, drawn exactly by adding i.i.d. Gumbel(0, 1)
noise to the logits and taking the top k in order (Kool et al., "Stochastic Beams and
Where to Find Them", arXiv 1903.06059). Its log-probability is

    log p(i_1..i_k) = sum_j [ s_(i_j) - logsumexp_{t not in i_1..i_(j-1)} s_t ].

GRPO (DeepSeekMath, arXiv 2402.03300): a group of G episodes per (image, question, rho),
advantages normalised within the group, the clipped surrogate, and the non-negative k3
estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1.
"""

from __future__ import annotations

import torch


def gumbel_top_k(logits: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[..., k] an exact Plackett-Luce sample of k ordered indices from logits [..., n]."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() + gumbel).topk(k, dim=-1).indices


def plackett_luce_log_prob(logits: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[...] log-probability of the ordered selection `order` [..., k] under logits [..., n]."""
    chosen = logits.gather(-1, order)  # [..., k]
    # logsumexp over the not-yet-chosen tokens = log(total - cumulative mass of earlier picks)
    m = logits.max(dim=-1, keepdim=True).values.detach()
    total = torch.exp(logits - m).sum(-1, keepdim=True)
    earlier = torch.cumsum(torch.exp(chosen - m), dim=-1) - torch.exp(chosen - m)
    remaining = (total - earlier).clamp_min(1e-30)
    return (chosen - m - torch.log(remaining)).sum(-1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[P, G] rewards -> (r - mean) / (std + eps) within each group of G episodes."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, adv: torch.Tensor,
              clip: float = 0.2, beta: float = 0.04) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate minus beta * k3 KL, averaged over episodes (to minimise)."""
    ratio = torch.exp(logp - logp_old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    delta = logp_ref - logp
    kl = torch.exp(delta) - delta - 1
    loss = -(surrogate - beta * kl).mean()
    return loss, {"kl": kl.mean().item(), "clip_frac": ((ratio - 1).abs() > clip).float().mean().item()}
