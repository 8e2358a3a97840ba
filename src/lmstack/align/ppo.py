"""PPO for RLHF (Ouyang et al. 2022; TRL's PPOTrainer layout): a policy and a value model
trained together, a reward model's score at the end of each response, a per-token KL
penalty to the frozen reference, GAE, clipped policy and value losses, several epochs of
minibatches over each rollout batch.

    model = PolicyAndValue(policy, value_model_from(reward_model))
    source = PPOSource(model, tok, prompts, reward_model, ref_model, batch_size=8, ppo_epochs=4, ...)
    Trainer(cfg, model, PPOObjective(), source).fit()

The value model is a transformer with a scalar head (model/heads.py), by default a copy of
the reward model, as in TRL: values[t] is its output at the position that predicts token t
(the state before the action). Per rollout batch (no gradients):
  r_t  = -kl_coef * (log pi_old(t) - log ref(t))      for every response token (k1, as TRL)
  r_T += RM(prompt + response)                        at the last token
  A, R = GAE(r, V, gamma, lam); A whitened over the batch's tokens
Metrics: score (the reward model's mean), kl (mean summed log pi_old - log ref per response),
reward (score - kl_coef * kl), kl_coef, completion_len, clip_frac, value_loss, policy_loss.

kl_target (nats per response, None = a fixed kl_coef): the adaptive controller of Ziegler et
al. 2019 (TRL's AdaptiveKLController): after each rollout batch of n responses,
  kl_coef *= 1 + clip(kl / kl_target - 1, -0.2, 0.2) * n / kl_horizon
so the penalty grows while the policy drifts past the target and shrinks below it. A fixed
coefficient only prices KL; a small reward model is cheap to exploit and the KL then keeps
growing, which the controller stops.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from lmstack.align.grpo import RolloutBatch, step_tokens, trim
from lmstack.align.losses import gae, masked_mean, policy_loss, token_logps, value_loss, whiten
from lmstack.align.reward_model import reward_model_from, score_sequences
from lmstack.align.rollout import RolloutEngine, RolloutSource, response_logps, rollout_tensors
from lmstack.model.heads import has_score_head
from lmstack.train.objectives import Objective
from lmstack.utils import LmstackError


def value_model_from(model) -> nn.Module:
    """A trainable copy of a reward model (or of a policy, given a fresh score head)."""
    vm = copy.deepcopy(model) if has_score_head(model) else reward_model_from(model)
    return vm.requires_grad_(True).train()


class PolicyAndValue(nn.Module):
    """The module the Trainer trains: forward(ids) -> (logits (B, T, V), values (B, T))."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        if not has_score_head(value):
            raise LmstackError("the value model needs a score head (value_model_from(...))")
        self.policy, self.value = policy, value
        self.config = policy.config              # the Trainer checks mask and context against it

    def forward(self, ids):
        return self.policy(ids), self.value(ids)[..., 0].float()


class PPOSource(RolloutSource):
    def __init__(self, model: PolicyAndValue, tokenizer, prompts: list[dict], reward_model, ref_model, *,
                 prompts_per_rollout: int = 16, batch_size: int = 8, grad_accum: int = 1, ppo_epochs: int = 4,
                 max_completion_len: int = 16, temperature: float = 1.0, fmt: str = "plain", kl_coef: float = 0.05,
                 gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True, stop_token_ids=None,
                 stop=None, seed: int = 0, rank: int = 0, world_size: int = 1, engine_dtype=None,
                 kl_target: float | None = None, kl_horizon: int = 10000):
        super().__init__(batch_size, grad_accum, ppo_epochs, seed, rank, world_size, shuffle=True)
        if not isinstance(model, PolicyAndValue):
            raise LmstackError("PPOSource takes the PolicyAndValue module the Trainer trains")
        if not has_score_head(reward_model):
            raise LmstackError("the reward model has no score head; train one with `lmstack align rm`")
        if getattr(reward_model.config, "vocab_size", None) != model.policy.config.vocab_size:
            raise LmstackError(f"the reward model's vocab_size={reward_model.config.vocab_size} differs from the "
                               f"policy's {model.policy.config.vocab_size}: it was trained with another tokenizer")
        self.model, self.reward_model, self.ref_model = model, reward_model.requires_grad_(False).eval(), ref_model
        if not kl_coef >= 0 or (kl_target is not None and not kl_target > 0) or kl_horizon < 1:
            raise LmstackError(f"need kl_coef >= 0, kl_target > 0 (or None), kl_horizon >= 1; got {kl_coef}, "
                               f"{kl_target}, {kl_horizon}")
        if kl_target is not None and not kl_coef > 0:
            raise LmstackError("kl_target adapts kl_coef by a factor: start it above 0")
        self.kl_coef, self.gamma, self.lam, self.whiten = kl_coef, gamma, lam, whiten_advantages
        self.kl_target, self.kl_horizon = kl_target, kl_horizon
        ctx = min(model.policy.config.context_length, reward_model.config.context_length)
        self.load_prompts(tokenizer, prompts, fmt, max_completion_len, ctx, prompts_per_rollout)
        self.temperature = temperature
        self.check_layout(prompts_per_rollout)
        self.engine = RolloutEngine(model.policy, tokenizer, max_completion_len=max_completion_len,
                                    temperature=temperature, stop_token_ids=stop_token_ids, stop=stop,
                                    dtype=engine_dtype, max_num_seqs=max(64, prompts_per_rollout),
                                    max_prompt_len=max(len(p) for p in self.prompt_ids))

    @torch.no_grad()
    def _rollout(self, index: int) -> dict:
        idx = self.prompt_indices(index)
        rollouts = [g[0] for g in self.engine.sample([self.prompt_ids[i] for i in idx], 1, self.sample_seed(index))]
        buf = rollout_tensors(rollouts)
        ids, mask, old = buf["input_ids"], buf["mask"], buf["old_logps"]
        ref = response_logps(self.ref_model, ids, mask, self.temperature)
        was = self.model.value.training
        self.model.value.eval()
        try:
            values = self.model.value(ids.to(next(self.model.value.parameters()).device))[:, :-1, 0].float().cpu()
        finally:
            self.model.value.train(was)
        values = values * mask
        scores = score_sequences(self.reward_model, [r.prompt_ids + r.token_ids for r in rollouts])
        kl = (old - ref) * mask                                       # k1 per token
        rewards = -self.kl_coef * kl
        last = (mask.sum(1).long() + torch.tensor([len(r.prompt_ids) for r in rollouts]) - 2)  # last response target
        rewards[torch.arange(len(rollouts)), last] += scores
        adv, returns = gae(rewards, values, self.gamma, self.lam, mask)
        if self.whiten:
            adv = whiten(adv, mask)
        buf.update(advantages=adv, ref_logps=ref, old_values=values, returns=returns)
        seq_kl = kl.sum(1)
        buf["stats"] = {"score": float(scores.mean()), "kl": float(seq_kl.mean()),
                        "reward": float((scores - self.kl_coef * seq_kl).mean()), "kl_coef": self.kl_coef,
                        "completion_len": float(mask.sum(1).mean())}
        if self.kl_target is not None:
            self.adapt_kl(float(self._mean_over_ranks(seq_kl.mean())), len(rollouts) * self.world_size)
        return buf

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            x = x.double().reshape(1)
            torch.distributed.all_reduce(x)           # every rank adapts kl_coef alike
            x = x / self.world_size
        return x

    def adapt_kl(self, kl: float, n: int) -> None:
        """The adaptive KL controller's update after a rollout batch of n responses whose mean
        summed KL is `kl` (a no-op without kl_target)."""
        if self.kl_target is None:
            return
        err = min(max(kl / self.kl_target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + err * n / self.kl_horizon

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": self.kl_coef}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.kl_coef = float(sd.get("kl_coef", self.kl_coef))

    def _micro(self, rows: dict, step_rows: dict) -> RolloutBatch:
        rows = trim(rows)
        stats = {k: torch.tensor(v) for k, v in self.buffer["stats"].items()}
        return RolloutBatch(rows["input_ids"], rows["mask"], rows["old_logps"], rows["advantages"], rows["ref_logps"],
                            rows["old_values"], rows["returns"],
                            step_tokens(step_rows["mask"], self.grad_accum, self.world_size), stats)


class PPOObjective(Objective):
    """Clipped policy loss (token mean over the batch) + vf_coef * clipped value loss."""
    name = "ppo"
    model_mask = "causal"

    def __init__(self, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
                 temperature: float = 1.0):
        if not (0 < cliprange < 1 and cliprange_value > 0 and vf_coef >= 0 and temperature > 0):
            raise LmstackError(f"need 0 < cliprange < 1, cliprange_value > 0, vf_coef >= 0, temperature > 0; got "
                               f"{cliprange}, {cliprange_value}, {vf_coef}, {temperature}")
        self.cliprange, self.cliprange_value, self.vf_coef, self.temperature = cliprange, cliprange_value, vf_coef, \
            temperature

    def loss(self, model, batch: RolloutBatch):
        logits, values = model(batch.input_ids)
        logps = token_logps(logits[:, :-1], batch.input_ids[:, 1:], self.temperature) * batch.mask
        pg, st = policy_loss(logps, batch.old_logps, batch.advantages, batch.mask, self.cliprange, "dapo",
                             n_tokens=batch.n_tokens)
        vl = value_loss(values[:, :-1], batch.old_values, batch.returns, batch.mask, self.cliprange_value)
        with torch.no_grad():
            vexp = masked_mean((values[:, :-1] - batch.returns) ** 2, batch.mask)
        return pg + self.vf_coef * vl, {**batch.stats, "clip_frac": st["clip_frac"], "policy_loss": pg.detach(),
                                        "value_loss": vl.detach(), "value_mse": vexp}

    def tokens(self, batch: RolloutBatch) -> int:
        return batch.input_ids.numel()
