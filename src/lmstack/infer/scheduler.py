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
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int            # tokens fed this step: positions num_computed .. +num_new-1

    @property
    def is_prefill_done(self) -> bool:
        """After this step every token (and draft token) of seq has K/V: sample from it."""
        return self.seq.num_computed_tokens + self.num_new_tokens >= len(self.seq) + len(self.seq.spec_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst) blocks

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


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

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling: already holds (shared) blocks, joins the running set."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove seq (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

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
                out.scheduled.append(ScheduledSeq(seq, n))
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
            if seq.num_computed_tokens == 0 and not seq.block_table:
                hit = bm.match_prefix(seq)
                seq.num_cached_tokens = hit if seq.num_preemptions == 0 else seq.num_cached_tokens
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.allocate(seq, seq.num_computed_tokens + n):
                bm.free(seq)   # give back the prefix-cache hits; retry next step
                seq.num_computed_tokens = seq.num_hashed_blocks = 0
                seq.last_block_hash = None
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        out.copies = bm.pending_copies
        bm.pending_copies = []
        return out
