"""Who runs this step, and with how many tokens: continuous batching with chunked prefill.

Every step the scheduler fills a token budget (`max_num_batched_tokens`):

1. Running sequences first, oldest first. A decoding sequence needs 1 token (plus its
   speculative draft tokens, if any); a sequence still prefilling gets the next chunk of
   its prompt, as large as the budget allows (chunked prefill: a long prompt never stalls
   the decodes of everyone else for more than one step's worth of tokens).
2. If the KV cache has no room for a running sequence's new tokens, the *newest* running
   sequence is preempted by recompute: its blocks are freed, its computed tokens forgotten,
   and it goes back to the front of the waiting queue with prompt + output so far as its new
   "prompt". Greedy output is unchanged (recomputing K/V gives the same values), only time
   is lost.
3. Then waiting sequences, first come first served, while budget, `max_num_seqs` and free
   blocks allow (none are admitted in a step that had to preempt). A newly admitted
   sequence first takes whatever full blocks the prefix cache already holds for it.

Sequences join and leave at every step; nothing waits for a batch to drain.

After the forward, `advance` books what was computed (and registers newly full blocks in
the prefix cache); `fork`, `finish` and `preempt_all` are the other ways a sequence enters
or leaves the running set. What the sampled tokens mean (stops, text) is postprocess.py's.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int            # tokens fed this step: positions num_computed .. +num_new-1 (drafts included)
    num_logits: int                # logits wanted for the last num_logits fed positions: the prompt-scoring
                                   # rows, then 1 + drafts when every token has K/V after this step
    is_prompt: bool                # feeds prompt (or recomputed) tokens rather than one decode token
    num_prompt_logits: int = 0     # of num_logits, the leading rows that score prompt tokens (prompt_logprobs)

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> "ScheduledSeq":
        """Decided at scheduling time, before the step moves seq's progress."""
        done = seq.num_computed_tokens + num_new_tokens >= len(seq) + len(seq.spec_token_ids)
        scoring = _num_prompt_logits(seq, num_new_tokens)
        return cls(seq, num_new_tokens, scoring + (1 + len(seq.spec_token_ids) if done else 0),
                   seq.num_output_tokens == 0 or seq.num_uncomputed_tokens > 1, scoring)


def _num_prompt_logits(seq: Sequence, num_new_tokens: int) -> int:
    """How many fed positions score a prompt token this step: p in [first, end) with `first`
    the next unscored position and `end` the chunk's end (at most the last prompt position,
    whose logits draw the first output token instead). They are the chunk's trailing
    positions, before the sampling row if the chunk ends the prompt: the runner returns the
    last num_logits rows."""
    first = seq.next_scored_position
    if first is None:
        return 0
    start = seq.num_computed_tokens
    if first < start:     # match_prefix(limit=...) keeps cached tokens before `first`
        raise AssertionError(f"seq {seq.seq_id}: position {first} must be scored but is already computed")
    end = min(start + num_new_tokens, seq.num_prompt_tokens - 1)
    return max(0, end - first)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst) blocks

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if s.is_prompt)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 2048):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def decoding(self) -> list[Sequence]:
        """Running sequences with exactly one token to compute (the ones that may speculate)."""
        return [s for s in self.running if s.num_uncomputed_tokens == 1]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A forked sibling shares parent's blocks and joins the running set."""
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence) -> None:
        """Remove seq (finished, aborted or failed) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence, out: SchedulerOutput | None = None) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        if out is not None:
            out.preempted.append(seq)
        self.num_preemptions += 1

    def preempt_all(self) -> int:
        """Preempt every running sequence by recompute (their K/V are no longer valid, e.g.
        after a weight update); the oldest ends up first in line. Returns how many."""
        n = len(self.running)
        for seq in reversed(list(self.running)):      # newest first: appendleft keeps the order
            self._preempt(seq)
        return n

    def advance(self, out: SchedulerOutput) -> None:
        """After the forward: the fed tokens have K/V; newly full blocks join the prefix
        cache (before any finish frees them; blocks holding draft tokens are never full of
        *accepted* tokens here, since drafts are counted but not yet in token_ids)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.register_full_blocks(s.seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        # 1-2. running sequences, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            # never feed past the context: trim draft tokens that would not fit
            room = self.max_model_len - len(seq)
            if len(seq.spec_token_ids) > room:
                seq.spec_token_ids = seq.spec_token_ids[:max(room, 0)]
            want = seq.num_uncomputed_tokens + len(seq.spec_token_ids)
            n = min(want, budget)
            if n < want and seq.spec_token_ids:   # drafts are verified all together or not at all
                seq.spec_token_ids = []
                n = min(seq.num_uncomputed_tokens, budget)
            while not bm.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq.of(seq, n))
                budget -= n
                i += 1
                continue
            # seq itself was preempted: everything after it is gone too
            break
        # 3. admit waiting sequences (not in a step that had to preempt)
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.num_pending_forks > self.max_num_seqs:
                break
            if seq.num_computed_tokens == 0 and not bm.block_table(seq.seq_id):
                seq.num_computed_tokens = hit = bm.match_prefix(seq, limit=seq.next_scored_position)
                seq.num_cached_tokens = hit if seq.num_preemptions == 0 else seq.num_cached_tokens
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.allocate(seq, seq.num_computed_tokens + n):
                bm.free(seq)   # give back the prefix-cache hits; retry next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.timing.first_scheduled = seq.timing.first_scheduled or time.perf_counter()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq.of(seq, n))
            budget -= n
        out.copies = bm.pending_copies
        bm.pending_copies = []
        return out
