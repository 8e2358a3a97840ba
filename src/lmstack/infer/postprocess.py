"""After the forward: logits -> tokens -> stop checks -> text; one request's fault stays its own.

For each scheduled sequence that produced logits this step:

* a sequence verifying speculative drafts keeps the accepted ones plus one target token
  (the speculator decides, rejection.py);
* a sequence scoring its prompt (prompt_logprobs) first takes the leading rows of its
  logits: each scores the prompt token after its position;
* every other sequence samples one token; all of them in one batched `sample` call. A
  request with n > 1 forks its n - 1 siblings here, once its prompt is prefilled: they
  share the prompt's logits row and blocks and then draw on their own;
* each new token is appended and the stop conditions checked in vLLM's order: EOS, a stop
  token id, a stop string (found by the completion's incremental detokenizer), max_tokens or
  the context length. A finished sequence frees its blocks at once.

Faults. Anything that raises while handling one sequence (its tokenizer, its stop strings,
its sampling parameters) fails that *request*: it finishes with `RequestOutput.error` set
and `finish_reason="error"`, its blocks are freed, and the rest of the batch goes on (when
the batched sampler raises, the rows are retried one by one so that only the faulty request
fails). The exception is logged with its traceback. A failing forward pass, by contrast,
concerns every scheduled request and propagates to the caller of `step`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

from lmstack.infer.detokenizer import Detokenizer
from lmstack.infer.outputs import Logprob, VocabLogprobs
from lmstack.infer.request import RequestState
from lmstack.infer.sampler import argmax_only, make_generator, sample, token_logprobs
from lmstack.infer.scheduler import Scheduler, SchedulerOutput
from lmstack.infer.sequence import Sequence

log = logging.getLogger("lmstack.infer")


class Postprocessor:
    def __init__(self, scheduler: Scheduler, detokenizer: Detokenizer, eos_token_id: int | None,
                 max_model_len: int, device: torch.device, new_seq_id: Callable[[], int], speculator=None):
        self.scheduler = scheduler
        self.detokenizer = detokenizer
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.device = device
        self.new_seq_id = new_seq_id
        self.speculator = speculator
        self.num_generated_tokens = 0

    def process(self, out: SchedulerOutput, logits: torch.Tensor,
                requests: dict[str, RequestState]) -> dict[str, RequestState]:
        """Book the step, turn its logits (sum of num_logits, V) into tokens; return the
        requests that moved, by id."""
        self.scheduler.advance(out)
        touched: dict[str, RequestState] = {}
        plain: list[tuple[Sequence, int]] = []                # (seq, its logits row)
        offset = 0
        for s in out.scheduled:
            seq, req = s.seq, requests[s.seq.request_id]
            touched[req.request_id] = req
            rows, offset = logits[offset:offset + s.num_logits], offset + s.num_logits
            if seq.is_finished:                               # its request already failed
                continue
            if s.num_prompt_logits:
                self._guard(req, self._score_prompt, seq, rows[:s.num_prompt_logits])
                rows = rows[s.num_prompt_logits:]
            if len(rows) == 0 or seq.is_finished:             # mid-prefill, or failed while scoring
                continue
            if seq.spec_token_ids:
                self._guard(req, self._verify, req, seq, rows)
                continue
            children = self._guard(req, self._fork, req, seq)
            if not seq.is_finished:
                plain += [(seq, offset - 1)] + [(c, offset - 1) for c in children]
        if plain:
            self._sample(plain, logits, requests)
        return touched

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.timing.finished = time.perf_counter()
        self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def fail(self, req: RequestState, exc: BaseException) -> None:
        """End req because of exc; its other completions end with it."""
        log.error("request %s failed: %s: %s", req.request_id, type(exc).__name__, exc, exc_info=exc)
        req.error = f"{type(exc).__name__}: {exc}"
        for seq in req.seqs:
            if not seq.is_finished:
                self.finish(seq, "error")

    def _guard(self, req: RequestState, fn, *args):
        try:
            return fn(*args)
        except Exception as e:     # one request's fault: fail it, keep the batch
            self.fail(req, e)
            return []

    # -- tokens ---------------------------------------------------------------------------
    def _fork(self, req: RequestState, parent: Sequence) -> list[Sequence]:
        """n > 1: once the prompt is prefilled, siblings share its blocks (copy-on-write)."""
        children = []
        for index in range(1, parent.num_pending_forks + 1):
            gen = make_generator(parent.sampling_params.seed, index, self.device)
            child = parent.fork(self.new_seq_id(), index, gen)
            self.scheduler.fork(parent, child)
            req.add_seq(child, self.detokenizer.incremental(child.sampling_params))
            children.append(child)
        parent.num_pending_forks = 0
        return children

    def _sample(self, pairs: list[tuple[Sequence, int]], logits: torch.Tensor,
                requests: dict[str, RequestState]) -> None:
        seqs = [s for s, _ in pairs]
        if all(argmax_only(s.sampling_params, s.num_output_tokens) for s in seqs):   # plain greedy batch
            idx = [i for _, i in pairs]
            rows = logits if idx == list(range(logits.shape[0])) else logits[torch.tensor(idx, device=logits.device)]
            for seq, token in zip(seqs, rows.argmax(dim=-1).tolist()):
                if not seq.is_finished:
                    self._guard(requests[seq.request_id], self._append, requests[seq.request_id], seq, token,
                                None, None)
            return
        try:
            out = sample(logits[torch.tensor([i for _, i in pairs], device=logits.device)],
                         [s.sampling_params for s in seqs], [s.generator for s in seqs],
                         prompt_token_ids=[s.prompt_token_ids for s in seqs],
                         output_token_ids=[s.output_token_ids for s in seqs], eos_token_id=self.eos_token_id)
        except Exception as e:
            if len(pairs) == 1:
                self.fail(requests[seqs[0].request_id], e)
            else:     # find the row that breaks the batch (a seeded row's RNG may have moved: a fault path)
                for pair in pairs:
                    self._sample([pair], logits, requests)
            return
        token_ids, lps = out.token_ids.tolist(), out.logprobs.tolist()
        entries = None
        if any(s.logprobs is not None for s in seqs):
            entries = self._logprob_dicts(out, [s.sampling_params.logprobs or 0 for s in seqs])
        for b, seq in enumerate(seqs):
            req = requests[seq.request_id]
            if seq.is_finished:                   # a sibling's fault already ended the request
                continue
            lp = None
            if seq.logprobs is not None:
                lp = entries[b]
            self._guard(req, self._append, req, seq, token_ids[b], lps[b], lp)

    def _logprob_dicts(self, out, ks: list[int]) -> list[dict[int, Logprob]]:
        """Each row b of a SamplerOutput as {token id: Logprob}: the chosen token first, then
        the row's top ks[b] (fewer where they hold the chosen token or removed tokens)."""
        token_ids, lps, ranks = out.token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        decode = self.detokenizer.decode_token
        dicts = []
        for b, tid in enumerate(token_ids):
            lp = {tid: Logprob(lps[b], ranks[b], decode(tid))}
            for r in range(ks[b]):
                alt, value = top_ids[b][r], top_lps[b][r]
                if value == -math.inf:            # removed by top-k/top-p/min-p: not an alternative
                    break
                lp.setdefault(alt, Logprob(value, r + 1, decode(alt)))
            dicts.append(lp)
        return dicts

    def _score_prompt(self, seq: Sequence, rows: torch.Tensor) -> None:
        """prompt_logprobs: rows (k, V) are the logits at the positions that score seq's next
        k unscored prompt tokens (scheduler.ScheduledSeq.num_prompt_logits)."""
        k = seq.sampling_params.prompt_logprobs
        if k == -1:                                         # the whole vocabulary, made on access
            lp = rows.float().log_softmax(dim=-1).cpu()
            seq.prompt_logprobs.extend(VocabLogprobs(row, self.detokenizer.decode_token) for row in lp)
            return
        first = len(seq.prompt_logprobs)
        targets = torch.tensor(seq.prompt_token_ids[first:first + rows.shape[0]], device=rows.device)
        seq.prompt_logprobs.extend(self._logprob_dicts(token_logprobs(rows, targets, k), [k] * rows.shape[0]))

    def _verify(self, req: RequestState, seq: Sequence, logits: torch.Tensor) -> None:
        """Speculative step for seq: keep the accepted drafts plus one target token."""
        drafts, seq.spec_token_ids = seq.spec_token_ids, []
        tokens, num_accepted = self.speculator.verify(seq, drafts, logits)
        # K/V of the fed last token and of the accepted drafts are valid; the rest is overwritten later
        seq.num_computed_tokens -= len(drafts) - num_accepted
        for t in tokens:
            self._append(req, seq, t, None, None)
            if seq.is_finished:
                break

    def _append(self, req: RequestState, seq: Sequence, token: int, logprob: float | None,
                lp: dict | None) -> None:
        """Add one token, then check (in vLLM's order) the stop conditions."""
        now = time.perf_counter()
        seq.append_token(token)
        seq.timing.first_token = seq.timing.first_token or now
        seq.timing.last_token = now
        self.num_generated_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(lp or {})
            seq.cumulative_logprob += logprob or 0.0
        p, detok = seq.sampling_params, req.detoks[seq.index]
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens and not p.ignore_eos and token == self.eos_token_id:
            detok.flush()
            self.finish(seq, "stop")
        elif n_out >= p.min_tokens and token in p.stop_token_ids:
            detok.flush()
            self.finish(seq, "stop", token)
        elif (matched := detok.append(token, n_out)) is not None:
            if p.include_stop_str_in_output:   # the detokenizer cut the text where the stop string starts
                detok.text += matched
            self.finish(seq, "stop", matched)
        elif (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq) >= self.max_model_len:
            detok.flush()
            self.finish(seq, "length")
