"""Speculative-decoding verification: keep draft tokens without changing the distribution.

A cheap proposer (a small draft model, or n-gram prompt lookup) guesses k tokens
x_1..x_k; one forward pass of the target model over them gives the target distributions
p_1..p_{k+1} at the k+1 positions. Modified rejection sampling (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023) then keeps a
prefix of the guesses so that the emitted tokens are distributed exactly as if the target
model had sampled them one at a time:

    for i in 1..k:   accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
                     on the first rejection emit a token from norm(max(0, p_i - q_i)), stop
    all accepted ->  emit a bonus token from p_{k+1}

Why it is exact: P(emit y at i) = min(p(y), q(y)) [accepted] + (1 - sum_z min(p, q)) *
max(0, p(y) - q(y)) / sum_z max(0, p - q) [residual] = p(y), since both sums equal 1 - TV(p, q).

A proposer without probabilities (n-gram lookup, greedy draft) is a point mass q = one-hot(x):
accept with probability p(x), and the residual is p with x removed. With temperature 0 the
target is one-hot too, which reduces to `greedy_verify`: keep drafts while they equal the
target argmax, and the output is token for token what plain greedy decoding gives.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from lmstack.infer.sampler import random_sample


def rejection_sample(target_probs: Tensor, draft_token_ids: Sequence[int] | Tensor,
                     draft_probs: Tensor | None = None,
                     generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Verify k draft tokens of one sequence.

    target_probs    (k+1, V) target sampling distributions at the k draft positions + 1
    draft_token_ids (k,)     the proposed tokens
    draft_probs     (k, V)   the proposer's distributions, or None for a point-mass proposer
    generator       the request's RNG (None: global RNG)
    Returns (tokens, num_accepted): the accepted drafts followed by one recovered or bonus
    token, so 1 <= len(tokens) == num_accepted + 1 <= k + 1.
    """
    p = target_probs.float()
    x = torch.as_tensor(draft_token_ids, dtype=torch.long, device=p.device).reshape(-1)  # (k,)
    k = x.numel()
    if p.dim() != 2 or p.shape[0] != k + 1:
        raise ValueError(f"target_probs must have shape (k+1, V) = ({k + 1}, V) for {k} draft tokens, "
                         f"got {tuple(p.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, p.shape[1]):
        raise ValueError(f"draft_probs must have shape (k, V) = {(k, p.shape[1])}, got {tuple(draft_probs.shape)}")
    rows = torch.arange(k, device=p.device)
    p_x = p[rows, x]                                                    # (k,) target prob of each draft
    q_x = draft_probs.float()[rows, x] if draft_probs is not None else torch.ones_like(p_x)
    # Always draw k uniforms so a seeded request consumes its RNG the same way every step.
    u = torch.rand(k, generator=generator, device=p.device)
    accepted = u * q_x < p_x                                            # u < p/q, without dividing by q
    # number of leading accepts: index of the first rejection, or k
    num_accepted = int(accepted.long().cumprod(0).sum()) if k else 0
    drafts = x[:num_accepted].tolist()
    if num_accepted == k:
        last = p[k]                                                     # bonus token
    else:
        q = draft_probs.float()[num_accepted] if draft_probs is not None else \
            torch.nn.functional.one_hot(x[num_accepted], p.shape[1]).float()
        last = (p[num_accepted] - q).clamp_min(0.0)
        if not float(last.sum()) > 0.0:                                 # p == q up to rounding: p itself
            last = p[num_accepted]
    token = int(random_sample(last.unsqueeze(0), [generator] if generator is not None else None)[0])
    return drafts + [token], num_accepted


def greedy_verify(target_token_ids: Sequence[int] | Tensor,
                  draft_token_ids: Sequence[int] | Tensor) -> tuple[list[int], int]:
    """Greedy verification: target_token_ids (k+1,) are the target argmax at each position.

    Keeps drafts while they match, then emits the target's own token. Returns
    (tokens, num_accepted) like `rejection_sample`.
    """
    target = [int(t) for t in (target_token_ids.tolist() if isinstance(target_token_ids, Tensor) else target_token_ids)]
    draft = [int(t) for t in (draft_token_ids.tolist() if isinstance(draft_token_ids, Tensor) else draft_token_ids)]
    if len(target) != len(draft) + 1:
        raise ValueError(f"greedy_verify needs k+1 = {len(draft) + 1} target tokens for {len(draft)} drafts, "
                         f"got {len(target)}")
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return target[:n + 1], n
