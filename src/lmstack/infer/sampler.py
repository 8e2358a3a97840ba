"""The sampler: pure, batched functions from next-token logits to chosen tokens.

One engine step ends with a (B, V) matrix of logits, one row per running sequence, each
row with its own `SamplingParams`. The pipeline for a row (same order as Hugging Face's
logits processors, and the semantics of vLLM):

    logits --penalties--> penalized --(logprobs are reported from here)
           --min_tokens (block EOS / stop ids)--> --temperature--> --top-k--> --top-p-->
           --min-p--> softmax --> draw (or argmax when temperature == 0)

* repetition_penalty (CTRL, Keskar et al. 2019) over prompt + output tokens: a positive
  logit is divided by the penalty, a negative one multiplied, so the token always becomes
  less likely for penalty > 1.
* presence / frequency penalties (OpenAI) over output tokens only:
  logit -= presence * [count > 0] + frequency * count.
* top-k keeps every token whose logit is >= the k-th largest (ties at the edge are kept).
* top-p keeps the smallest prefix of the sorted distribution whose mass reaches top_p:
  token i (sorted, most likely first) stays iff the mass strictly before it is < top_p,
  so the most likely token always stays.
* min-p drops tokens with p < min_p * p_max (Nguyen et al. 2024).

Reported logprobs follow `SamplingParams.logprobs_mode` (vLLM's names):

* "raw_logprobs" (default): `log_softmax` of the *penalized* logits, the model's
  distribution after the penalties the user asked for, before temperature and truncation.
  Comparable across temperatures (vLLM's raw logprobs, apart from penalties); what beam
  search adds up.
* "processed_logprobs": `log_softmax` of exactly the logits the token is drawn from (after
  min_tokens, temperature, top-k, top-p, min-p; tokens removed by truncation get -inf).
  Greedy rows take no temperature or truncation, so theirs are the penalized, min_tokens-
  blocked logits (as in vLLM). RL needs these: log pi(token) of the policy that sampled it.

Per-request seeds: each seeded row draws its noise from its own `torch.Generator`
("exponential race": argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i),
so a seeded request produces the same tokens whatever else shares its batch. Rows without
a seed draw from the global RNG together.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from lmstack.infer.sampling_params import SamplingParams


class SamplerOutput(NamedTuple):
    token_ids: Tensor             # (B,) long     chosen token per row
    logprobs: Tensor              # (B,) float32  log p(chosen) in the row's reported distribution
    ranks: Tensor                 # (B,) long     1-based rank of the chosen token in that distribution
    top_token_ids: Tensor | None  # (B, K) long   K = largest `logprobs` asked for in the batch; None if none
    top_logprobs: Tensor | None   # (B, K) float32, sorted descending


def make_generator(seed: int | None, index: int = 0, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The RNG of completion `index` of a request with `seed` (None -> no private RNG).

    Completion 0 uses the seed itself, so n=1 and the first of n>1 agree; the others get
    distinct, deterministic seeds.
    """
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed if index == 0 else (seed * 1_000_003 + index) % (2 ** 63))
    return g


def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) long: how many times each token id occurs in each row's list."""
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.long, device=device)
    for b, ids in enumerate(token_lists):
        if len(ids):
            counts[b].index_add_(0, torch.as_tensor(ids, dtype=torch.long, device=device),
                                 torch.ones(len(ids), dtype=torch.long, device=device))
    return counts


def apply_penalties(logits: Tensor, prompt_mask: Tensor | None, output_counts: Tensor,
                    presence: Tensor, frequency: Tensor, repetition: Tensor) -> Tensor:
    """Penalize tokens already seen. logits (B, V) float; prompt_mask (B, V) bool (token occurs
    in the prompt) or None; output_counts (B, V) long; presence/frequency/repetition (B,)."""
    seen = output_counts > 0
    if prompt_mask is not None:
        seen = seen | prompt_mask
    r = repetition.to(logits.dtype).unsqueeze(1)                      # (B, 1)
    penalized = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalized, logits)
    logits = logits - frequency.to(logits.dtype).unsqueeze(1) * output_counts.to(logits.dtype)
    logits = logits - presence.to(logits.dtype).unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """logits (B, V) / temperature (B,). Callers keep greedy rows (T ~ 0) out of this."""
    return logits / temperature.to(logits.dtype).unsqueeze(1)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask (to -inf) tokens outside top-k, then outside top-p of what is left. One sort.

    top_k (B,) long, <= 0 = off for that row; top_p (B,) float, 1.0 = off for that row.
    """
    B, V = logits.shape
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)    # (B, V) each
    if top_k is not None:
        k = top_k.to(logits.device).long()
        kth = sorted_logits.gather(1, (k.clamp(1, V) - 1).unsqueeze(1))  # (B, 1) k-th largest
        drop = (sorted_logits < kth) & (k > 0).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_p is not None:
        p = top_p.to(device=logits.device, dtype=torch.float32).unsqueeze(1)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                        # exclusive prefix sum
        drop = (mass_before >= p) & (p < 1.0)
        drop[:, 0] = False                                                # always keep the argmax
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens with p < min_p * p_max. min_p (B,), 0 = off for that row."""
    probs = logits.float().softmax(dim=-1)
    threshold = min_p.to(device=logits.device, dtype=torch.float32).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def random_sample(probs: Tensor, generators: Sequence[torch.Generator | None] | None = None) -> Tensor:
    """Draw one token per row of probs (B, V) (rows need not be normalized). Rows with a
    generator use only it, so their draw does not depend on the rest of the batch."""
    B, V = probs.shape
    noise = torch.empty(B, V, dtype=torch.float32, device=probs.device)
    generators = generators if generators is not None else [None] * B
    unseeded = [b for b, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), V, device=probs.device).exponential_()
    for b, g in enumerate(generators):
        if g is not None:
            noise[b].exponential_(generator=g)
    # argmax p_i / E_i; E_i clamped away from 0 so a zero-probability token never wins via 0/0.
    return (probs.float() / noise.clamp_min_(1e-20)).argmax(dim=-1)


def _param_tensor(params_list: Sequence[SamplingParams], name: str, dtype, device) -> Tensor:
    return torch.tensor([getattr(p, name) for p in params_list], dtype=dtype, device=device)


def penalized_logits(logits: Tensor, params_list: Sequence[SamplingParams],
                     prompt_token_ids: Sequence[Sequence[int]] | None = None,
                     output_token_ids: Sequence[Sequence[int]] | None = None) -> Tensor:
    """(B, V) float32 logits after repetition/presence/frequency penalties (no-op rows untouched)."""
    logits = logits.float()
    if not any(p.needs_penalties for p in params_list):
        return logits
    B, V = logits.shape
    if output_token_ids is None:
        raise ValueError("penalties need output_token_ids (one list per row, possibly empty)")
    counts = token_counts(output_token_ids, V, logits.device)
    prompt_mask = None
    if any(p.repetition_penalty != 1.0 for p in params_list):
        if prompt_token_ids is None:
            raise ValueError("repetition_penalty needs prompt_token_ids (one list per row)")
        prompt_mask = token_counts(prompt_token_ids, V, logits.device) > 0
    f32 = torch.float32
    return apply_penalties(logits, prompt_mask, counts,
                           _param_tensor(params_list, "presence_penalty", f32, logits.device),
                           _param_tensor(params_list, "frequency_penalty", f32, logits.device),
                           _param_tensor(params_list, "repetition_penalty", f32, logits.device))


def _block_early_stop(logits: Tensor, params_list: Sequence[SamplingParams],
                      output_token_ids: Sequence[Sequence[int]] | None, eos_token_id: int | None) -> Tensor:
    """min_tokens: rows with fewer outputs than asked may not pick EOS or a stop token id."""
    rows = [b for b, p in enumerate(params_list) if p.min_tokens > 0]
    if not rows:
        return logits
    if output_token_ids is None:
        raise ValueError("min_tokens needs output_token_ids (one list per row, possibly empty)")
    logits = logits.clone()
    for b in rows:
        p = params_list[b]
        if len(output_token_ids[b]) < p.min_tokens:
            banned = list(p.stop_token_ids)
            if eos_token_id is not None and not p.ignore_eos:
                banned.append(eos_token_id)
            if banned:
                logits[b, banned] = float("-inf")
    return logits


def _truncate(logits: Tensor, params_list: Sequence[SamplingParams]) -> Tensor:
    """Temperature, top-k, top-p, min-p for rows that sample (greedy rows are not passed in)."""
    dev = logits.device
    logits = apply_temperature(logits, _param_tensor(params_list, "temperature", torch.float32, dev))
    use_k = any(p.top_k_enabled for p in params_list)
    use_p = any(p.top_p < 1.0 for p in params_list)
    if use_k or use_p:
        logits = apply_top_k_top_p(logits,
                                   _param_tensor(params_list, "top_k", torch.long, dev) if use_k else None,
                                   _param_tensor(params_list, "top_p", torch.float32, dev) if use_p else None)
    if any(p.min_p > 0.0 for p in params_list):
        logits = apply_min_p(logits, _param_tensor(params_list, "min_p", torch.float32, dev))
    return logits


def sampling_probs(logits: Tensor, params_list: Sequence[SamplingParams],
                   prompt_token_ids: Sequence[Sequence[int]] | None = None,
                   output_token_ids: Sequence[Sequence[int]] | None = None,
                   eos_token_id: int | None = None) -> Tensor:
    """(B, V) float32: the distribution each row's next token is drawn from (one-hot of the
    argmax for greedy rows). Speculative decoding verifies drafts against these."""
    logits = penalized_logits(logits, params_list, prompt_token_ids, output_token_ids)
    logits = _block_early_stop(logits, params_list, output_token_ids, eos_token_id)
    probs = torch.zeros_like(logits)
    greedy = [b for b, p in enumerate(params_list) if p.greedy]
    rand = [b for b, p in enumerate(params_list) if not p.greedy]
    if greedy:
        probs[greedy, logits[greedy].argmax(dim=-1)] = 1.0
    if rand:
        probs[rand] = _truncate(logits[rand], [params_list[b] for b in rand]).softmax(dim=-1)
    return probs


def argmax_only(params: SamplingParams, num_output_tokens: int) -> bool:
    """True when `sample` would return the argmax of the raw logits for this row and nothing
    else is asked of it: greedy, no penalties, min_tokens reached, no logprobs. The engine then
    takes one argmax for such a batch instead of the whole pipeline (at batch-1 decode of a tiny
    model the pipeline's ~20 small ops cost about a tenth of the step)."""
    return (params.greedy and params.logprobs is None and num_output_tokens >= params.min_tokens
            and not params.needs_penalties)


def sample(logits: Tensor, params_list: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None, *,
           prompt_token_ids: Sequence[Sequence[int]] | None = None,
           output_token_ids: Sequence[Sequence[int]] | None = None,
           eos_token_id: int | None = None) -> SamplerOutput:
    """Choose one token per row of logits (B, V).

    params_list[b] and generators[b] belong to row b (generators[b] = None: global RNG).
    prompt_token_ids / output_token_ids (lists per row) are needed only when some row uses
    penalties or min_tokens; eos_token_id only for min_tokens.
    """
    B, V = logits.shape
    if len(params_list) != B:
        raise ValueError(f"sample: {B} rows of logits but {len(params_list)} SamplingParams")
    if generators is not None and len(generators) != B:
        raise ValueError(f"sample: {B} rows of logits but {len(generators)} generators")
    logits = penalized_logits(logits, params_list, prompt_token_ids, output_token_ids)
    reported = logits.log_softmax(dim=-1)                      # (B, V) raw logprobs
    logits = _block_early_stop(logits, params_list, output_token_ids, eos_token_id)
    processed = [b for b, p in enumerate(params_list) if p.processed_logprobs]
    drawn_from = logits.clone() if processed else None         # (B, V) the logits each row draws from

    token_ids = torch.empty(B, dtype=torch.long, device=logits.device)
    greedy = [b for b, p in enumerate(params_list) if p.greedy]
    rand = [b for b, p in enumerate(params_list) if not p.greedy]
    if greedy:
        token_ids[greedy] = logits[greedy].argmax(dim=-1)
    if rand:
        truncated = _truncate(logits[rand], [params_list[b] for b in rand])
        gens = [generators[b] for b in rand] if generators is not None else None
        token_ids[rand] = random_sample(truncated.softmax(dim=-1), gens)
        if drawn_from is not None:
            drawn_from[rand] = truncated
    if processed:                                              # those rows report the processed distribution
        reported[processed] = drawn_from[processed].log_softmax(dim=-1)

    chosen = reported.gather(1, token_ids.unsqueeze(1))        # (B, 1)
    ranks = (reported > chosen).sum(dim=-1) + 1
    k = max((p.logprobs or 0) for p in params_list)
    top_ids = top_lp = None
    if k > 0:
        top_lp, top_ids = reported.topk(min(k, V), dim=-1)     # may hold -inf in processed rows
    return SamplerOutput(token_ids, chosen.squeeze(1), ranks, top_ids, top_lp)


def token_logprobs(logits: Tensor, token_ids: Tensor, k: int = 0) -> SamplerOutput:
    """Raw log-probabilities of given tokens (prompt scoring): logits (N, V), token_ids (N,)
    -> each token's log_softmax value and rank at its row, and the row's top k."""
    lp = logits.float().log_softmax(dim=-1)                    # (N, V)
    chosen = lp.gather(1, token_ids.unsqueeze(1))              # (N, 1)
    ranks = (lp > chosen).sum(dim=-1) + 1
    top_lp, top_ids = lp.topk(min(k, lp.shape[1]), dim=-1) if k > 0 else (None, None)
    return SamplerOutput(token_ids, chosen.squeeze(1), ranks, top_ids, top_lp)
