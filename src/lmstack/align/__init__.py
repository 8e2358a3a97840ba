"""Floor 4: alignment. Every method is an objective (and, for RL, a rollout batch source) for
the one Trainer; every rollout is sampled by the one engine with the policy's current weights.

    from lmstack.align import dpo_loss, group_advantages, gae          # the losses, on tensors
    from lmstack.align import DPOObjective, PairBatches, reference_logps  # DPO / IPO
    from lmstack.align import RewardObjective, reward_model_from          # reward models
    from lmstack.align import GRPOSource, GRPOObjective                   # GRPO, verifiable rewards
    from lmstack.align import PPOSource, PPOObjective, PolicyAndValue     # PPO (RLHF)
    from lmstack.align import AlignConfig, run_align                      # `lmstack align rm|dpo|ppo|grpo`

Files: losses (pure functions), data (pairs, prompts, tinyworld sets, pair batches), dpo,
reward_model, rollout (engine sampling, rewards, the resumable rollout source), grpo, ppo,
rewards (verifiable reward functions), evaluate (held-out measurements), config + runner
(the commands' library side), figures.
"""
from lmstack.align.losses import (bradley_terry_loss, dpo_loss, gae, group_advantages, kl_k3, policy_loss,
                                  token_logps, value_loss)
from lmstack.align.data import (AlignDataError, PairBatch, PairBatches, tinyworld_pairs, tinyworld_prompts,
                                tokenize_pairs)
from lmstack.align.dpo import DPOObjective, reference_logps, sequence_logps
from lmstack.align.reward_model import (RewardObjective, pairwise_accuracy, reward_model_from, score_sequences)
from lmstack.align.rollout import RewardError, Rollout, RolloutEngine, compute_rewards
from lmstack.align.grpo import GRPOObjective, GRPOSource, RolloutBatch
from lmstack.align.ppo import PolicyAndValue, PPOObjective, PPOSource, value_model_from
from lmstack.align.rewards import exact_answer, integer_format
from lmstack.align.config import AlignConfig
from lmstack.align.runner import run_align

__all__ = ["dpo_loss", "group_advantages", "gae", "bradley_terry_loss", "kl_k3", "policy_loss", "value_loss",
           "token_logps", "AlignDataError", "PairBatch", "PairBatches", "tinyworld_pairs", "tinyworld_prompts",
           "tokenize_pairs", "DPOObjective", "reference_logps", "sequence_logps", "RewardObjective",
           "pairwise_accuracy", "reward_model_from", "score_sequences", "RewardError", "Rollout", "RolloutEngine",
           "compute_rewards", "GRPOObjective", "GRPOSource", "RolloutBatch", "PolicyAndValue", "PPOObjective",
           "PPOSource", "value_model_from", "exact_answer", "integer_format", "AlignConfig", "run_align"]
