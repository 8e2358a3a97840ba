"""Speculative decoding: guess k tokens cheaply, verify them in one target forward.

    LLM(target, speculative={"method": "ngram", "num_speculative_tokens": 4,
                             "prompt_lookup_max": 4, "prompt_lookup_min": 1, "backoff": True})
    LLM(target, speculative={"method": "draft", "model": path_or_Transformer, "num_speculative_tokens": 4,
                             "adaptive": True})

How it plugs into the step (engine.py):
  1. `prepare(decoding seqs)` before scheduling. n-gram: propose now (prompt lookup, S's
     ngram.py). Draft model: reserve k placeholder tokens, so the scheduler allocates KV
     slots (and does copy-on-write) for 1 + k tokens.
  2. `propose(scheduler_output)` after scheduling (draft model only): the draft applies the
     step's copy-on-writes to its cache, catches up on the tokens it has not seen, then
     runs k - 1 single-token steps, writing its own K/V.
  3. The target runs [last token, d_1..d_k] and returns k + 1 rows of logits;
     `verify` keeps the longest accepted prefix plus one target token (S's rejection.py):
     greedy requests keep drafts equal to the target argmax, so the output is token for
     token the non-speculative one; sampled requests use rejection sampling, which keeps
     the target distribution exactly.

A speculator is handed what it needs (the block manager, the context length, the EOS id,
the target's vocab/device/dtype), not the engine. The draft model has its own paged cache
with the same block ids as the target's (same block tables, read from the block manager,
same copy-on-write), so its only bookkeeping is how many leading tokens of each sequence
have draft K/V. Prefix-cache hits do not carry draft K/V, so a sequence's first
speculation prefills the draft from 0 (rewriting shared blocks with the same values:
harmless); so does its first speculation after a preemption.

Adaptive draft length (`"adaptive"`, default on for a draft model, off for n-gram): a draft
model that keeps missing costs a draft forward per guess and a wider verify every step for
nothing. So each sequence tracks how far to look ahead, close to the heuristic of
`transformers`' assisted generation: all drafts accepted -> one more next time (up to
num_speculative_tokens); some rejected -> one fewer (at least 1). The back-off
(`"backoff"`, default: as `adaptive`): none accepted twice in a row -> no speculation for 4,
then 8, 16, 32 steps before probing again; any acceptance ends it. The choices depend only
on earlier steps, so greedy output stays identical and rejection sampling stays exact.
Measured side by side (bench_engine's models, k=6, 2 CPU threads): a draft that guesses 6%
of copy prompts runs at 0.96x with adaptation and 0.57x without; on stories, where it
guesses 95%, 2.88x vs 2.89x. n-gram guesses cost nothing to make, so shrinking them only
loses tokens (stories 1.72x adaptive vs 2.21x fixed): adaptive lookahead is off by default
there. But verifying k guesses is not free either (on a CPU, a k+1-token forward costs
several one-token forwards), so n-gram on text the model does not copy from its prompt can
run slower than no speculation: `"backoff": True` gives n-gram the pause alone, with k kept
fixed. `stats()` says which is on (spec_adaptive, spec_backoff) and the acceptance rate.

Restrictions (documented, by design): only decoding sequences speculate (a sequence
still prefilling does not); requests asking for logprobs, raw or processed, do not
speculate (drafts carry no logprobs): they decode one token per step, so their logprobs
are exactly those of the plain path; drafts are dropped for a step whose token budget
cannot fit them all.
"""
from __future__ import annotations

import torch

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.ngram import NgramProposer
from lmstack.infer.paged_cache import PagedKVCache
from lmstack.infer.rejection import greedy_verify, rejection_sample
from lmstack.infer.runner import ModelRunner, RunnerRow
from lmstack.infer.sampler import random_sample, sampling_probs
from lmstack.infer.sequence import Sequence
from lmstack.utils import LmstackError

_KEYS = {"method", "num_speculative_tokens", "model", "prompt_lookup_max", "prompt_lookup_min", "adaptive",
         "backoff"}
MAX_PAUSE = 32     # longest back-off, in steps, of an adaptive speculator whose drafts keep missing


def make_speculator(spec: dict, *, block_manager: BlockManager, max_model_len: int, vocab_size: int,
                    eos_token_id: int | None, device: torch.device, dtype: torch.dtype) -> "Speculator":
    """Build the speculator `spec` asks for (see the module docstring for its keys)."""
    if not isinstance(spec, dict) or spec.get("method") not in ("ngram", "draft"):
        raise LmstackError(f"speculative={spec!r}: needs method 'ngram' or 'draft', e.g. "
                           f"{{'method': 'ngram', 'num_speculative_tokens': 4}}")
    unknown = sorted(set(spec) - _KEYS)
    if unknown:
        raise LmstackError(f"speculative: unknown key(s) {unknown}; valid: {sorted(_KEYS)}")
    k = spec.get("num_speculative_tokens", 4)
    if not isinstance(k, int) or k < 1:
        raise LmstackError(f"speculative num_speculative_tokens={k!r} must be an int >= 1")
    adaptive = spec.get("adaptive", spec["method"] == "draft")
    backoff = spec.get("backoff", adaptive)
    for name, value in (("adaptive", adaptive), ("backoff", backoff)):
        if not isinstance(value, bool):
            raise LmstackError(f"speculative {name}={value!r} must be true or false")
    if spec["method"] == "ngram":
        return NgramSpeculator(k, adaptive, max_model_len, eos_token_id, spec.get("prompt_lookup_max", 4),
                               spec.get("prompt_lookup_min", 1), backoff=backoff)
    if "model" not in spec:
        raise LmstackError("speculative method 'draft' needs 'model': a run dir, HF folder or Transformer")
    return DraftSpeculator(k, adaptive, max_model_len, eos_token_id, spec["model"], block_manager,
                           vocab_size, device, dtype, backoff=backoff)


class Speculator:
    method = ""

    def __init__(self, k: int, adaptive: bool, max_model_len: int, eos_token_id: int | None, *,
                 backoff: bool | None = None):
        self.k = k
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.adaptive = adaptive
        self.backoff = adaptive if backoff is None else backoff
        self.proposed = self.accepted = self.steps = self.paused_steps = 0
        self._look: dict[int, list[int]] = {}     # seq_id -> [lookahead, consecutive misses, pause left]

    def _budget(self, seq: Sequence) -> int:
        """Drafts worth proposing: verifying k drafts yields up to k + 1 tokens. Counts down a
        back-off pause (called once per step for every decoding sequence)."""
        p = seq.sampling_params
        if p.logprobs is not None:
            return 0
        k = self.k
        if self.adaptive or self.backoff:
            look = self._look.setdefault(seq.seq_id, [self.k, 0, 0])
            if look[2] > 0:
                look[2] -= 1
                self.paused_steps += 1
                return 0
            k = look[0]          # stays self.k unless adaptive
        left = (p.max_tokens if p.max_tokens is not None else 1 << 30) - seq.num_output_tokens
        return max(0, min(k, left - 1, self.max_model_len - len(seq) - 1))

    def _adapt(self, seq: Sequence, proposed: int, accepted: int) -> None:
        look = self._look.get(seq.seq_id)
        if look is None or proposed == 0:
            return
        if accepted == proposed:
            look[1] = 0
            if self.adaptive:
                look[0] = min(self.k, look[0] + 1)
        elif accepted > 0:
            look[1] = 0
            if self.adaptive:
                look[0] = max(1, look[0] - 1)
        else:
            look[1] += 1
            if self.adaptive:
                look[0] = 1
            if self.backoff and look[1] >= 2:   # 2 misses in a row: pause 4, then 8, 16, 32 steps
                look[2] = min(MAX_PAUSE, 2 ** look[1])

    def prepare(self, seqs: list[Sequence]) -> None: ...

    def propose(self, out) -> None: ...

    def draft_probs(self, seq: Sequence):
        return None

    def verify(self, seq: Sequence, drafts: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
        """logits (k+1, V) of the target at [last, d_1..d_k] -> (tokens to append, num accepted)."""
        p, k = seq.sampling_params, len(drafts)
        outs = [seq.output_token_ids + drafts[:j] for j in range(k + 1)]
        probs = sampling_probs(logits, [p] * (k + 1), prompt_token_ids=[seq.prompt_token_ids] * (k + 1),
                               output_token_ids=outs, eos_token_id=self.eos_token_id)    # (k+1, V)
        if p.greedy:
            tokens, n = greedy_verify(probs.argmax(dim=-1), drafts)
        else:
            tokens, n = rejection_sample(probs, drafts, self.draft_probs(seq), seq.generator)
        self.proposed += k
        self.accepted += n
        self.steps += 1
        self._adapt(seq, k, n)
        return tokens, n

    def release(self, seq: Sequence) -> None:
        self._look.pop(seq.seq_id, None)

    def stats(self) -> dict:
        return {"spec_method": self.method, "spec_adaptive": self.adaptive, "spec_backoff": self.backoff,
                "spec_num_speculative_tokens": self.k, "spec_paused_steps": self.paused_steps,
                "spec_proposed_tokens": self.proposed,
                "spec_accepted_tokens": self.accepted, "spec_verify_steps": self.steps,
                "spec_acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
                "spec_mean_accepted_per_step": self.accepted / self.steps if self.steps else 0.0}


class NgramSpeculator(Speculator):
    method = "ngram"

    def __init__(self, k: int, adaptive: bool, max_model_len: int, eos_token_id: int | None, n_max: int,
                 n_min: int, *, backoff: bool | None = None):
        super().__init__(k, adaptive, max_model_len, eos_token_id, backoff=backoff)
        self.proposer = NgramProposer(n_max=n_max, n_min=n_min, num_speculative_tokens=k)

    def prepare(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            budget = self._budget(seq)
            seq.spec_token_ids = self.proposer.propose(seq.token_ids)[:budget] if budget else []


class DraftSpeculator(Speculator):
    method = "draft"

    def __init__(self, k: int, adaptive: bool, max_model_len: int, eos_token_id: int | None, model,
                 block_manager: BlockManager, vocab_size: int, device: torch.device, dtype: torch.dtype, *,
                 backoff: bool | None = None):
        super().__init__(k, adaptive, max_model_len, eos_token_id, backoff=backoff)
        from lmstack.infer import loader
        draft, _, _ = loader.load(model, None, device, dtype)
        cfg = loader.model_config(draft)
        if cfg.vocab_size != vocab_size:
            raise LmstackError(f"draft model vocab_size={cfg.vocab_size} differs from the target's "
                               f"{vocab_size}; the draft must share the target's tokenizer")
        if cfg.context_length < max_model_len:
            raise LmstackError(f"draft model context_length={cfg.context_length} is shorter than the target's "
                               f"{max_model_len}")
        self.block_manager = bm = block_manager     # read-only: the target's block tables
        self.cache = PagedKVCache(cfg.n_layer, bm.num_blocks, bm.block_size, cfg.n_kv_head, cfg.head_dim,
                                  dtype, device)
        self.runner = ModelRunner(draft, self.cache, bm, device)
        self._q: dict[int, torch.Tensor] = {}     # seq_id -> (k, V) draft distributions (sampled requests)
        # seq_id -> (its num_preemptions then, leading tokens with draft K/V): a preemption
        # frees the blocks, so an entry from before the sequence's latest one counts as 0
        self._done: dict[int, tuple[int, int]] = {}

    def _draft_computed(self, seq: Sequence) -> int:
        mark, n = self._done.get(seq.seq_id, (-1, 0))
        return n if mark == seq.num_preemptions else 0

    def prepare(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.spec_token_ids = [0] * self._budget(seq)      # placeholders: reserve KV slots

    def propose(self, out) -> None:
        self.cache.copy_blocks(list(out.copies))      # the target's copy-on-writes, in the draft's cache
        seqs = [s.seq for s in out.scheduled if s.seq.spec_token_ids]
        if not seqs:
            return
        ks = {seq.seq_id: len(seq.spec_token_ids) for seq in seqs}
        for seq in seqs:
            seq.spec_token_ids = []
        # catch-up: feed every token the draft has not seen; its last logits give d_1
        table = self.block_manager.block_table
        starts = [self._draft_computed(seq) for seq in seqs]
        rows = [RunnerRow(seq.token_ids[n:], n, table(seq.seq_id), 1) for seq, n in zip(seqs, starts)]
        qs: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq in seqs}
        for seq in seqs:
            self._done[seq.seq_id] = (seq.num_preemptions, len(seq))
        active = seqs
        while active:
            logits = self.runner.execute(rows)                                          # (len(active), V)
            for seq, row_logits in zip(active, logits):
                seq.spec_token_ids.append(self._draw(seq, row_logits, qs[seq.seq_id]))
            active = [s for s in active if len(s.spec_token_ids) < ks[s.seq_id]]
            rows = [RunnerRow([s.spec_token_ids[-1]], len(s) + len(s.spec_token_ids) - 1, table(s.seq_id), 1)
                    for s in active]
        for seq in seqs:
            if qs[seq.seq_id]:
                self._q[seq.seq_id] = torch.stack(qs[seq.seq_id])

    def _draw(self, seq: Sequence, logits: torch.Tensor, q_rows: list) -> int:
        p = seq.sampling_params
        if p.greedy:
            return int(logits.argmax())
        q = sampling_probs(logits[None], [p], prompt_token_ids=[seq.prompt_token_ids],
                           output_token_ids=[seq.output_token_ids + seq.spec_token_ids],
                           eos_token_id=self.eos_token_id)[0]
        q_rows.append(q)
        return int(random_sample(q[None], [seq.generator] if seq.generator is not None else None)[0])

    def draft_probs(self, seq: Sequence):
        return self._q.pop(seq.seq_id, None)

    def verify(self, seq: Sequence, drafts: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
        before = len(seq)
        tokens, n = super().verify(seq, drafts, logits)
        # draft K/V is valid for the original tokens and the accepted drafts it was fed (d_1..d_{k-1})
        self._done[seq.seq_id] = (seq.num_preemptions, before + min(n, len(drafts) - 1))
        return tokens, n

    def release(self, seq: Sequence) -> None:
        super().release(seq)
        self._q.pop(seq.seq_id, None)
        self._done.pop(seq.seq_id, None)
