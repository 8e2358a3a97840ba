"""Floor 3: training. The one training loop (trainer.py) and what plugs into it: objectives
(causal, masked, prefix LM; distill.py: a teacher's logits; finetuning and alignment add
theirs), batch sources, AdamW +
schedules, checkpoint/resume (also of partly frozen models), and torchrun DDP/FSDP.

    from lmstack.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(data="DIR", out="runs/x", max_steps=200)).fit()
    result = Trainer(cfg, model, objective, batches, val_batches=val).fit()
"""
from lmstack.train.config import TrainConfig
from lmstack.train.objectives import (IGNORE_INDEX, Batch, CausalLM, MaskedLM, Objective, PrefixLM, as_objective,
                                      token_loss)
from lmstack.train.optim import build_optimizer, lr_multiplier, param_groups
from lmstack.train.trainer import NonFiniteLossError, Trainer

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "Objective", "as_objective", "CausalLM", "MaskedLM",
           "PrefixLM", "Batch", "IGNORE_INDEX", "token_loss", "build_optimizer", "lr_multiplier", "param_groups"]
