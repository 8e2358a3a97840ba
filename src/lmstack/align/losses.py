"""The alignment losses as plain functions on tensors: DPO/IPO, Bradley-Terry, group advantages
(GRPO), GAE (PPO), the clipped policy and value losses, and the k3 KL estimator.

    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)          # per example (B,)
    adv = group_advantages(rewards, group_size=8)                              # (B*G,)
    adv, ret = gae(rewards, values, gamma=1.0, lam=0.95)                       # over one response (T,)
    loss = policy_loss(logps, old_logps, adv, mask, epsilon=0.2, loss_type="grpo")

Nothing here knows models, batches or the Trainer: the objectives in dpo.py, grpo.py, ppo.py
and reward_model.py compute log-probabilities and call these. Conventions follow TRL where it
defines one (named at each function), so numbers can be compared side by side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) per example. Inputs (B,): summed
    log-probabilities of each response under the policy and the frozen reference.

    logits = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio margin;
    sigmoid: -logsigmoid(beta * logits)           (= ln 2 when policy == reference)
    ipo:     (logits - 1 / (2 * beta)) ** 2        (as TRL's dpo_loss defined it before 1.0; TRL
             1.x first divides each log-ratio by its response's token count: pass per-token
             mean log-probs to get that variant)
    Returns (losses, chosen_rewards, rejected_rewards), rewards = beta * log-ratio, detached."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Reward-model loss per pair: -logsigmoid(r_chosen - r_rejected), (B,)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages: rewards (B*G,) laid out group by group (the G samples of prompt 0,
    then prompt 1 ...) -> r - mean(group), divided by (std(group) + eps) when `scale`.

    std is the unbiased (Bessel-corrected, n - 1) standard deviation and eps = 1e-4, both as
    TRL's GRPOTrainer (scale_rewards="group"); scale=False is Dr. GRPO's r - mean. A group
    whose rewards are all equal gets advantage 0 (it carries no learning signal)."""
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    g = rewards.view(-1, group_size)                                   # (B, G)
    centered = g - g.mean(dim=1, keepdim=True)
    if scale:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centered = centered / (std + eps)
    same = (g == g[:, :1]).all(dim=1, keepdim=True)     # exactly 0, not a mean's rounding error / eps
    return torch.where(same, torch.zeros_like(centered), centered).reshape(-1)


def gae(rewards: Tensor, values: Tensor, gamma: float = 1.0, lam: float = 0.95,
        mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over a response's tokens.

    rewards, values: (T,) or (B, T); values[t] = V(state before token t). After the last token
    the episode ends (V = 0). delta_t = r_t + gamma * V_{t+1} - V_t and
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V (the value targets).
    mask (same shape, 1 = a response token): positions after a row's end hold padding; they
    get advantage 0 and their values are not bootstrapped from."""
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must have one shape")
    m = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    r, v = rewards * m, values * m
    T = r.shape[-1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[..., 0])
    for t in reversed(range(T)):
        next_v = v[..., t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[..., t] + gamma * next_v - v[..., t]
        last = (delta + gamma * lam * last) * m[..., t]
        adv[..., t] = last
    return adv, adv + v


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (TRL's masked_whiten, unbiased variance)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def token_logps(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(targets) under softmax(logits / temperature): logits (B, T, V), targets (B, T) ->
    (B, T), in fp32. With temperature = the sampling temperature this is the distribution
    the engine drew from (its processed logprobs), which the importance ratio needs."""
    lp = (logits.float() / temperature).log_softmax(-1)
    return lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate, Schulman's k3: exp(ref - pi) - (ref - pi) - 1 (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon: float = 0.2,
                loss_type: str = "grpo", max_completion_length: int | None = None, ref_logps: Tensor | None = None,
                beta: float = 0.0, n_tokens: float | None = None,
                n_seqs: int | None = None) -> tuple[Tensor, dict]:
    """The clipped surrogate (PPO/GRPO), aggregated as TRL's loss types. All (B, T) but
    advantages, which may be (B,) (one per sequence, GRPO) or (B, T) (per token, PPO).

    per_token = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) [+ beta * k3 KL to ref]
    grpo:    mean over each sequence's tokens, then mean over sequences
    dapo:    sum over all tokens / n_tokens (default: this batch's token count; a caller
             splitting a batch passes the whole batch's, so the parts add up to its mean)
    dr_grpo: sum over all tokens / (B * max_completion_length)
    n_seqs: the B of grpo and dr_grpo when the caller left out rows that carry no gradient
    (advantage 0, no KL term), so the loss and its gradient are those of the whole batch.
    Returns (loss, {"clip_frac", "kl"}) with kl the masked mean of k3 (0 without ref_logps)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; valid: {', '.join(GRPO_LOSS_TYPES)}")
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(per_token)
    if ref_logps is not None:
        kl = kl_k3(logps, ref_logps)
        if beta:
            per_token = per_token + beta * kl
    m = mask.to(per_token.dtype)
    B = per_token.size(0) if n_seqs is None else n_seqs
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / B
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / (m.sum() if n_tokens is None else n_tokens)
    else:
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token * m).sum() / (B * max_completion_length)
    with torch.no_grad():
        # the clip is active where it changes the objective (TRL's is_low/high_clipped)
        was_clipped = (((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))) & (m > 0)
        stats = {"clip_frac": masked_mean(was_clipped.float(), m), "kl": masked_mean(kl, m)}
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> Tensor:
    """PPO's clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old +- clip) - R)^2))."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
