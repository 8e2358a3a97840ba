"""DPO and IPO for the one Trainer: an objective over batches of preference pairs whose frozen
reference log-probabilities were computed once, before training, and cached with the pairs.

    ref = reference_logps(model, pairs, batch_size=16)        # {"ref_chosen", "ref_rejected"}: (N,)
    batches = PairBatches(pairs, batch_size=8, extras=ref)
    Trainer(cfg, model, DPOObjective(beta=0.1), batches, val_batches=held_out).fit()

rpo_alpha > 0 adds alpha * the chosen responses' mean token NLL (RPO, Pang et al. 2024; TRL's
rpo_alpha), which keeps DPO from lowering the chosen answers' likelihood along with the
rejected ones'.

The reference is the policy as it starts (the SFT model): computing its log-probs once costs
one no-grad pass over the data and frees its memory for training, and it works the same for
LoRA policies (adapters start at B = 0, so the starting policy is the base with adapters off).

Metrics per step (and on held-out pairs in the val lines):
  reward_acc   share of pairs with implicit reward beta*log(pi/ref) higher for chosen (TRL's
               rewards/accuracies; 0 at step 0, where both rewards are 0)
  margin       mean chosen_reward - rejected_reward (the implicit reward margin)
  logp_chosen, logp_rejected   mean summed log-prob of each response under the policy: DPO
               pushes the margin up and often both log-probs down; this shows it
  logp_acc     share of pairs whose chosen response is more likely than the rejected one under
               the policy itself: a preference accuracy that the SFT model has too
"""
from __future__ import annotations

import torch
from torch import Tensor

from lmstack.align.data import PairBatch, collate_pairs
from lmstack.align.losses import DPO_LOSS_TYPES, dpo_loss, token_logps
from lmstack.train.objectives import Objective
from lmstack.utils import LmstackError, autocast


def sequence_logps(model, batch: PairBatch, per_token: bool = False):
    """Summed log-prob of each row's response tokens: (2B,) [chosen rows, then rejected];
    with per_token, also the (2B, T-1) token log-probs (zero off the responses)."""
    logits = model(batch.input_ids)                                          # (2B, T, V)
    lp = token_logps(logits[:, :-1], batch.input_ids[:, 1:]) * batch.loss_mask   # (2B, T-1)
    return (lp.sum(-1), lp) if per_token else lp.sum(-1)


@torch.no_grad()
def reference_logps(model, pairs, batch_size: int = 16, device=None, dtype=torch.float32) -> dict[str, Tensor]:
    """The reference's summed response log-probs of every pair, once: {"ref_chosen", "ref_rejected"}
    (N,) on the CPU. `model` is run in eval mode and left in the mode it was in."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    chosen, rejected = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            idx = list(range(start, min(start + batch_size, len(pairs))))
            batch = collate_pairs([pairs[i] for i in idx], idx).to(device)
            with autocast(torch.device(device), dtype):
                lp = sequence_logps(model, batch).float().cpu()
            chosen.append(lp[:len(idx)])
            rejected.append(lp[len(idx):])
    finally:
        model.train(was_training)
    out = {"ref_chosen": torch.cat(chosen), "ref_rejected": torch.cat(rejected)}
    if not all(torch.isfinite(v).all() for v in out.values()):
        bad = int((~torch.isfinite(out["ref_chosen"] + out["ref_rejected"])).nonzero()[0])
        raise LmstackError(f"{pairs[bad].source}: the reference model gives a non-finite log-probability; "
                           f"check the reference model's weights")
    return out


class DPOObjective(Objective):
    """DPO (loss_type="sigmoid") or IPO (loss_type="ipo") over PairBatches carrying the cached
    reference log-probs as extras "ref_chosen" / "ref_rejected"."""
    name = "dpo"
    model_mask = "causal"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", rpo_alpha: float = 0.0):
        if loss_type not in DPO_LOSS_TYPES:
            raise LmstackError(f"loss_type={loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
        if not beta > 0:
            raise LmstackError(f"beta={beta!r} must be > 0")
        if not rpo_alpha >= 0:
            raise LmstackError(f"rpo_alpha={rpo_alpha!r} must be >= 0")
        self.beta, self.loss_type, self.rpo_alpha = beta, loss_type, rpo_alpha

    def loss(self, model, batch: PairBatch):
        if "ref_chosen" not in batch.extras:
            raise LmstackError("DPO batches must carry the reference log-probs (PairBatches(extras="
                               "reference_logps(...)))")
        logps, tok_lp = sequence_logps(model, batch, per_token=True)
        B = batch.index.numel()
        pc, pr = logps[:B], logps[B:]
        losses, cr, rr = dpo_loss(pc, pr, batch.extras["ref_chosen"], batch.extras["ref_rejected"],
                                  self.beta, self.loss_type)
        loss = losses.mean()
        if self.rpo_alpha:    # RPO (TRL's rpo_alpha): + alpha * mean NLL of the chosen responses' tokens
            loss = loss - self.rpo_alpha * tok_lp[:B].sum() / batch.loss_mask[:B].sum().clamp(min=1)
        with torch.no_grad():
            metrics = {"reward_acc": (cr > rr).float().mean(), "margin": (cr - rr).mean(),
                       "logp_chosen": pc.mean(), "logp_rejected": pr.mean(), "logp_acc": (pc > pr).float().mean()}
        return loss, metrics

    def tokens(self, batch: PairBatch) -> int:
        return int(batch.lengths.sum())
