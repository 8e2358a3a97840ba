"""Generation from an EncoderDecoder: greedy and beam search, as plain loops.

The encoder runs once per request (`encode`: its output and every decoder layer's cross-
attention K/V); then the decoder runs one token per step over a ContiguousKVCache of its own
self-attention. `use_cache=False` instead feeds the whole decoder prefix at every step (the
plain loop the cached one is tested against).

    seqs = greedy(model, input_ids, attention_mask, max_new_tokens=20, eos_id=1)
    seqs, scores = beam_search(model, input_ids, num_beams=4, max_new_tokens=20, eos_id=1)

Both return decoder ids (B, 1 + generated) that begin with `decoder_start_id` and are padded
with `pad_id` after a row's EOS, as `transformers`' `generate` returns them. Beam search keeps
Hugging Face's bookkeeping (as infer/beam_search.py does for the decoder-only engine): each
step the best 2W continuations over a source's W beams are taken in order; one ending in EOS,
or at max_new_tokens, is a finished hypothesis if it ranks among the best W, scored
sum_logprob / generated_len ** length_penalty; the best W unfinished ones are the next beams;
a source is done when W hypotheses are finished and its best live beam, scored at the current
length, cannot beat the worst of them (early_stopping=False).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lmstack.model.attention import EncoderMemory
from lmstack.model.cache import ContiguousKVCache


class _Decoder:
    """Next-token log-probs for N decoder rows of equal length over a fixed encoder memory."""

    def __init__(self, model, memory: EncoderMemory, max_len: int, use_cache: bool):
        cfg = model.config
        self.model, self.memory, self.use_cache = model, memory, use_cache
        N = memory.positions.shape[0]
        p = next(model.parameters())
        self.cache = ContiguousKVCache(cfg.n_layer, N, max_len, cfg.n_kv_head, cfg.head_dim, p.dtype, p.device) \
            if use_cache else None

    def __call__(self, seqs: Tensor) -> Tensor:
        """seqs (N, L) -> log-probs (N, vocab_size) float32 of each row's next token."""
        if self.cache is None:
            logits = self.model.decode(seqs, self.memory)[:, -1]
        else:                                              # only the newest token; the rest is cached
            N, L = seqs.shape
            pos = torch.full((N, 1), L - 1, dtype=torch.long, device=seqs.device)
            logits = self.model.decode(seqs[:, -1:], self.memory, positions=pos, cache=self.cache)[:, -1]
        return logits.float().log_softmax(dim=-1)

    def reorder(self, rows: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)


def _start(model, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, n: int, use_cache: bool):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    memory = model.encode(input_ids, attention_mask)
    if n > 1:
        memory = memory.repeat_interleave(n)              # one copy of each source per beam
    B = input_ids.shape[0]
    seqs = torch.full((B * n, 1), model.config.decoder_start_id, dtype=torch.long, device=input_ids.device)
    return _Decoder(model, memory, max_new_tokens + 1, use_cache), seqs


@torch.no_grad()
def greedy(model, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 20,
           eos_id: int | None = None, pad_id: int = 0, use_cache: bool = True) -> Tensor:
    """The most probable next token each step, until EOS in every row or max_new_tokens."""
    step, seqs = _start(model, input_ids, attention_mask, max_new_tokens, 1, use_cache)
    done = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    for _ in range(max_new_tokens):
        tok = step(seqs).argmax(dim=-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
        if eos_id is not None:
            done |= tok == eos_id
            if bool(done.all()):
                break
    return seqs


@torch.no_grad()
def beam_search(model, input_ids: Tensor, attention_mask: Tensor | None = None, num_beams: int = 4,
                max_new_tokens: int = 20, eos_id: int | None = None, pad_id: int = 0, length_penalty: float = 1.0,
                use_cache: bool = True) -> tuple[Tensor, Tensor]:
    """The best hypothesis of each source: (sequences (B, 1 + L) padded with pad_id, scores (B,))."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    B, W = input_ids.shape[0], num_beams
    step, seqs = _start(model, input_ids, attention_mask, max_new_tokens, W, use_cache)
    cum = torch.full((B, W), float("-inf"), device=seqs.device)
    cum[:, 0] = 0.0                       # all W beams start equal: expand only the first one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]   # (score, tokens), best first
    done = [False] * B
    for length in range(1, max_new_tokens + 1):              # generated tokens after this step
        logp = step(seqs).view(B, W, -1)                                      # (B, W, V)
        V = logp.shape[-1]
        cand, idx = (cum[:, :, None] + logp).view(B, W * V).topk(min(2 * W, W * V), dim=-1)   # best first
        rows, next_cum, next_tok = [], [], []
        for b in range(B):
            kept: list[tuple[int, int, float]] = []          # (parent beam, token, cum logprob)
            if not done[b]:
                for rank in range(cand.shape[1]):
                    parent, tok, score = int(idx[b, rank]) // V, int(idx[b, rank]) % V, float(cand[b, rank])
                    if (eos_id is not None and tok == eos_id) or length == max_new_tokens:
                        if rank < W:                          # only the top W may finish
                            toks = seqs[b * W + parent].tolist() + [tok]
                            finished[b].append((score / length ** length_penalty, toks))
                    elif len(kept) < W:
                        kept.append((parent, tok, score))
                finished[b] = sorted(finished[b], key=lambda f: f[0], reverse=True)[:W]
                done[b] = not kept or length == max_new_tokens or (
                    len(finished[b]) == W and not kept[0][2] / length ** length_penalty > finished[b][-1][0])
            if done[b] or not kept:                          # a finished source keeps stepping, ignored
                kept = [(0, pad_id, float("-inf"))] * W
            kept += [kept[-1][:2] + (float("-inf"),)] * (W - len(kept))
            rows += [b * W + p for p, _, _ in kept]
            next_tok += [t for _, t, _ in kept]
            next_cum.append([c for _, _, c in kept])
        if all(done):
            break
        rows_t = torch.tensor(rows, device=seqs.device)
        seqs = torch.cat([seqs[rows_t], torch.tensor(next_tok, device=seqs.device)[:, None]], dim=1)
        cum = torch.tensor(next_cum, device=seqs.device)
        step.reorder(rows_t)
    best = [f[0] for f in finished]
    L = max(len(toks) for _, toks in best)
    out = torch.full((B, L), pad_id, dtype=torch.long, device=input_ids.device)
    for b, (_, toks) in enumerate(best):
        out[b, :len(toks)] = torch.tensor(toks)
    return out, torch.tensor([s for s, _ in best])
