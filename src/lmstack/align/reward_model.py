"""Reward models: the transformer with a scalar head, trained on preference pairs with the
Bradley-Terry loss, and scoring of whole sequences.

    rm = reward_model_from(policy)                     # a copy of the policy, LM head -> score head
    Trainer(cfg, rm, RewardObjective(), PairBatches(pairs, 8), val_batches=held_out).fit()
    scores = score_sequences(rm, [prompt_ids + completion_ids, ...])     # (N,) floats

The score of a sequence is the head's output at its last real token (right padding): the
final hidden state there after norm_f -> linear -> scalar (model/heads.py). Metrics: "acc",
the share of pairs scored chosen > rejected (the held-out pairwise accuracy in val lines),
and "margin", the mean score difference.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from lmstack.align.data import PAD_ID, PairBatch
from lmstack.align.losses import bradley_terry_loss
from lmstack.model.heads import add_score_head, has_score_head, last_token_indices
from lmstack.train.objectives import Objective
from lmstack.utils import LmstackError, autocast


def reward_model_from(model, seed: int = 0):
    """A trainable copy of `model` whose LM head is a fresh score head (every weight trainable).
    LoRA adapters are kept as they are; merge them first to train a full reward model."""
    rm = copy.deepcopy(model)
    if not has_score_head(rm):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            add_score_head(rm)
    rm.train()
    return rm


def scores_at_last_token(model, ids: Tensor, lengths: Tensor) -> Tensor:
    """ids (N, T) right-padded, lengths (N,) -> the score at each row's last real token, (N,) fp32."""
    out = model(ids, logits_indices=last_token_indices(lengths, ids.size(1)))     # (N, n_out)
    if out.size(-1) != 1:
        raise LmstackError(f"the reward model's head has {out.size(-1)} outputs, not 1; build it with "
                           f"reward_model_from() (add_score_head)")
    return out[:, 0].float()


class RewardObjective(Objective):
    """Bradley-Terry: -logsigmoid(r(chosen) - r(rejected)) averaged over the pairs."""
    name = "reward"
    model_mask = "causal"

    def loss(self, model, batch: PairBatch):
        s = scores_at_last_token(model, batch.input_ids, batch.lengths)
        B = batch.index.numel()
        rc, rr = s[:B], s[B:]
        with torch.no_grad():
            metrics = {"acc": (rc > rr).float().mean(), "margin": (rc - rr).mean()}
        return bradley_terry_loss(rc, rr).mean(), metrics

    def tokens(self, batch: PairBatch) -> int:
        return int(batch.lengths.sum())


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], batch_size: int = 32, dtype=torch.float32) -> Tensor:
    """The reward model's score of each token sequence (prompt + completion), (N,) on the CPU."""
    if not seqs:
        return torch.zeros(0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ctx = model.config.context_length
    out = []
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            for j, s in enumerate(chunk):
                if not s or len(s) > ctx:
                    raise LmstackError(f"sequence #{start + j} has {len(s)} tokens; the reward model takes 1.."
                                       f"{ctx} (its context)")
            T = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), T), PAD_ID, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
            lengths = torch.tensor([len(s) for s in chunk])
            with autocast(device, dtype):
                out.append(scores_at_last_token(model, ids.to(device), lengths.to(device)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def pairwise_accuracy(model, pairs, batch_size: int = 32) -> float:
    """Share of pairs whose chosen sequence the reward model scores higher than the rejected one."""
    rc = score_sequences(model, [p.chosen.ids for p in pairs], batch_size)
    rr = score_sequences(model, [p.rejected.ids for p in pairs], batch_size)
    return float((rc > rr).float().mean())
