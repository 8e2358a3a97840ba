"""Validation loss and perplexity of a causal LM over a token stream.

The stream (a `ShardSet`'s `.tokens`, or any 1-D int array) is cut into consecutive,
non-overlapping windows of `seq_len + 1` tokens; every token after the first of a window is
predicted from the ones before it in that window. The loss is the mean next-token
cross-entropy over all predicted tokens (nats/token) and perplexity = exp(loss). Unlike a
trainer's periodic estimate on random batches, this is deterministic and covers the whole
stream (or its first `max_tokens`).

    from lmstack.eval import evaluate_loss
    evaluate_loss(model, ShardSet(dir / "shards", "val"), seq_len=256)  # {"loss", "perplexity", "tokens"}
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def perplexity(loss: float) -> float:
    """exp(mean loss in nats); inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokens, seq_len: int, batch_size: int = 8,
                  max_tokens: int | None = None, device: torch.device | str | None = None) -> dict:
    """Mean next-token loss of `model` over `tokens` (array-like or an object with `.tokens`)."""
    tokens = np.asarray(getattr(tokens, "tokens", tokens))
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"need more than seq_len={seq_len} tokens to evaluate, got {len(tokens)}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, n_windows, batch_size):
            idx = range(start, min(start + batch_size, n_windows))
            # (B, T + 1): the last target of one window is
            # the first input of the next, as in the shard stream.
            rows = np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in idx]).astype(np.int64)
            batch = torch.from_numpy(rows).to(device)
            x, y = batch[:, :-1], batch[:, 1:]           # (B, T) each
            logits = model(x).float()                    # (B, T, V)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count}
