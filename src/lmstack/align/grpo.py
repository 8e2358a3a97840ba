"""GRPO (Shao et al. 2024) with verifiable rewards: a rollout source and an objective.

    source = GRPOSource(policy, tok, prompts, [exact_answer], group_size=8, prompts_per_rollout=4,
                        batch_size=8, max_completion_len=8)
    Trainer(cfg, policy, GRPOObjective(loss_type="grpo"), source).fit()

Each rollout batch: P prompts per rank (a seeded pass over the prompt records), G samples each
through the engine with the policy's current weights, every reward function scored on every
completion, advantages normalized within each prompt's group (losses.group_advantages), and,
with beta > 0, the frozen reference's log-probs for the k3 KL penalty. The source then serves
the P*G rows as micro-batches `num_iterations` times (TRL's mu); the objective recomputes the
policy's log-probs under the sampling temperature and takes the clipped ratio against the
engine's recorded ones (losses.policy_loss, loss types grpo / dr_grpo / dapo). Rows whose
advantage is 0 (every sample of their prompt scored the same) have no gradient when there is
no KL term: skip_zero_advantage leaves them out of the update's forward and backward, with
the loss still normalized over all rows (the same gradient, less work: with a sparse reward
most groups are such).

Metrics: reward (mean total reward of the rollout), reward_std, reward_<fn> per function,
frac_zero_std (groups with no signal), completion_len (tokens), clip_frac, kl (k3, to the
reference; 0 when beta = 0 and no reference is given).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmstack.align.losses import GRPO_LOSS_TYPES, group_advantages, policy_loss, token_logps
from lmstack.align.rollout import RolloutEngine, RolloutSource, compute_rewards, response_logps, rollout_tensors
from lmstack.train.objectives import Objective
from lmstack.utils import LmstackError


@dataclass
class RolloutBatch:
    """Rows of prompt + completion. input_ids (B, T); mask, old_logps, ref_logps (B, T-1);
    advantages (B,) per sequence or (B, T-1) per token; PPO adds old_values and returns (B, T-1).
    n_tokens: the optimizer step's completion tokens over all ranks / (grad_accum * W) (dapo's
    normalizer per micro-batch); stats: the rollout's metrics (0-dim tensors)."""
    input_ids: Tensor
    mask: Tensor
    old_logps: Tensor
    advantages: Tensor
    ref_logps: Tensor | None
    old_values: Tensor | None
    returns: Tensor | None
    n_tokens: Tensor
    stats: dict
    n_seqs: int | None = None     # rows of the micro-batch before zero-advantage rows were left out


def step_tokens(step_mask: Tensor, grad_accum: int, world_size: int) -> Tensor:
    """Completion tokens of the optimizer step on all ranks, divided by grad_accum * W."""
    n = step_mask.sum().reshape(1).double()
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)      # (gloo and NCCL alike: the batch is on the CPU here)
    return (n / (grad_accum * world_size)).float().reshape(())


def trim(rows: dict) -> dict:
    """Cut the padding columns every row of this micro-batch has (shorter forward)."""
    T = int(rows["mask"].nonzero()[:, 1].max()) + 2 if rows["mask"].any() else 2
    return {k: (v[:, :T] if k == "input_ids" else v[:, :T - 1] if v.dim() == 2 else v) for k, v in rows.items()}


class GRPOSource(RolloutSource):
    def __init__(self, policy, tokenizer, prompts: list[dict], reward_fns, *, reward_weights=None,
                 group_size: int = 8, prompts_per_rollout: int = 4, batch_size: int = 8, grad_accum: int = 1,
                 num_iterations: int = 1, max_completion_len: int = 16, temperature: float = 1.0, fmt: str = "plain",
                 ref_model=None, stop_token_ids=None, stop=None, scale_rewards: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, engine_dtype=None, ignore_eos: bool = False,
                 skip_zero_advantage: bool = True):
        super().__init__(batch_size, grad_accum, num_iterations, seed, rank, world_size, shuffle=False)
        if group_size < 2:
            raise LmstackError(f"group_size={group_size}: GRPO compares samples of one prompt, it needs >= 2")
        if not reward_fns:
            raise LmstackError("GRPO needs at least one reward function")
        self.reward_fns = list(reward_fns)
        self.reward_weights = list(reward_weights or [1.0] * len(self.reward_fns))
        if len(self.reward_weights) != len(self.reward_fns):
            raise LmstackError(f"{len(self.reward_weights)} reward weights for {len(self.reward_fns)} reward functions")
        self.group_size, self.scale_rewards = group_size, scale_rewards
        self.ref_model, self.skip_zero_advantage = ref_model, skip_zero_advantage
        self.load_prompts(tokenizer, prompts, fmt, max_completion_len, policy.config.context_length,
                          prompts_per_rollout)
        self.check_layout(prompts_per_rollout * group_size)
        self.engine = RolloutEngine(policy, tokenizer, max_completion_len=max_completion_len, temperature=temperature,
                                    stop_token_ids=stop_token_ids, stop=stop, dtype=engine_dtype, ignore_eos=ignore_eos,
                                    max_num_seqs=max(64, prompts_per_rollout * group_size),
                                    max_prompt_len=max(len(p) for p in self.prompt_ids))
        self.max_completion_len, self.temperature = max_completion_len, temperature

    def _rollout(self, index: int) -> dict:
        idx = self.prompt_indices(index)
        groups = self.engine.sample([self.prompt_ids[i] for i in idx], self.group_size, self.sample_seed(index))
        rollouts = [r for g in groups for r in g]
        records = [self.records[i] for i in idx for _ in range(self.group_size)]
        rewards, per_fn = compute_rewards(self.reward_fns, self.reward_weights, records, [r.text for r in rollouts])
        adv = group_advantages(rewards, self.group_size, scale=self.scale_rewards)
        buf = rollout_tensors(rollouts)
        buf["advantages"] = adv
        if self.ref_model is not None:
            buf["ref_logps"] = response_logps(self.ref_model, buf["input_ids"], buf["mask"], self.temperature)
        g = rewards.view(-1, self.group_size)
        buf["stats"] = {"reward": float(rewards.mean()),
                        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                        "frac_zero_std": float((g.std(dim=1) < 1e-6).float().mean()),
                        "completion_len": float(buf["mask"].sum(1).mean()), **per_fn}
        return buf

    def _micro(self, rows: dict, step_rows: dict) -> RolloutBatch:
        n = rows["input_ids"].size(0)
        if self.skip_zero_advantage and "ref_logps" not in rows:
            # a row with advantage 0 and no KL term has loss 0 and gradient 0 at any ratio: leave
            # it out of the forward and backward (n_seqs keeps the loss that of all n rows)
            keep = rows["advantages"] != 0
            keep[0] |= not keep.any()                   # (one row keeps the graph of an all-zero batch)
            rows = {k: v[keep] for k, v in rows.items()}
        rows = trim(rows)
        stats = {k: torch.tensor(v) for k, v in self.buffer["stats"].items()}
        return RolloutBatch(rows["input_ids"], rows["mask"], rows["old_logps"], rows["advantages"],
                            rows.get("ref_logps"), None, None,
                            step_tokens(step_rows["mask"], self.grad_accum, self.world_size), stats, n_seqs=n)


def completion_logps(model, ids: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """log p(target) under softmax(logits / T) at the completion positions only, (B, T-1), zero
    elsewhere. The LM head and softmax run on those positions alone (logits_indices): a prompt's
    positions cost no vocabulary-sized work (TRL's logits_to_keep, per token)."""
    B, T = ids.shape
    b, t = mask.nonzero(as_tuple=True)                                    # (N,) completion targets
    logits = model(ids, logits_indices=b * T + t)                          # (N, V)
    lp = token_logps(logits, ids[b, t + 1], temperature)                    # (N,)
    return torch.zeros_like(mask, dtype=lp.dtype).index_put((b, t), lp)


class GRPOObjective(Objective):
    """The clipped GRPO surrogate (+ beta * k3 KL when the batches carry reference log-probs)."""
    name = "grpo"
    model_mask = "causal"

    def __init__(self, loss_type: str = "grpo", epsilon: float = 0.2, beta: float = 0.0, temperature: float = 1.0,
                 max_completion_len: int | None = None):
        if loss_type not in GRPO_LOSS_TYPES:
            raise LmstackError(f"loss_type={loss_type!r}; valid: {', '.join(GRPO_LOSS_TYPES)}")
        if loss_type == "dr_grpo" and not max_completion_len:
            raise LmstackError("loss_type='dr_grpo' normalizes by max_completion_len; pass it")
        if not (0 < epsilon < 1 and beta >= 0 and temperature > 0 and math.isfinite(beta)):
            raise LmstackError(f"need 0 < epsilon < 1, beta >= 0, temperature > 0; got epsilon={epsilon}, "
                               f"beta={beta}, temperature={temperature}")
        self.loss_type, self.epsilon, self.beta = loss_type, epsilon, beta
        self.temperature, self.max_completion_len = temperature, max_completion_len

    def loss(self, model, batch: RolloutBatch):
        logps = completion_logps(model, batch.input_ids, batch.mask, self.temperature)
        loss, st = policy_loss(logps, batch.old_logps, batch.advantages, batch.mask, self.epsilon, self.loss_type,
                               self.max_completion_len, batch.ref_logps, self.beta, batch.n_tokens, batch.n_seqs)
        return loss, {**batch.stats, **st}

    def tokens(self, batch: RolloutBatch) -> int:
        return batch.input_ids.numel()
