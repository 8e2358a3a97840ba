"""Floor 3: training. Objectives (causal, masked, prefix LM), AdamW + schedules, the one
training loop with checkpoint/resume, and torchrun DDP/FSDP.

    from lmstack.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(data="DIR", out="runs/x", max_steps=200)).fit()
"""
from lmstack.train.config import TrainConfig
from lmstack.train.objectives import Batch, CausalLM, MaskedLM, Objective, PrefixLM
from lmstack.train.optim import build_optimizer, lr_multiplier, param_groups
from lmstack.train.trainer import NonFiniteLossError, Trainer

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "Objective", "CausalLM", "MaskedLM", "PrefixLM",
           "Batch", "build_optimizer", "lr_multiplier", "param_groups"]
