"""One request's state inside the engine: tokens, KV block table, progress, timing.

A user request with `n` completions starts as one `Sequence`. When its prompt has been
prefilled, the engine forks `n - 1` siblings that share the prompt's KV blocks (the block
manager counts references and copies a shared block on first write). Each sibling is then
an independent sequence that the scheduler runs, preempts and finishes on its own.

Positions: the sequence's tokens are `prompt_token_ids + output_token_ids`; the first
`num_computed_tokens` of them have K/V in the cache. Decoding means exactly one token is
uncomputed (the one just sampled); prefilling means more than one.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # queued (new or preempted); holds no KV blocks
    RUNNING = "running"        # holds KV blocks; scheduled each step until finished
    FINISHED = "finished"      # done (stop, length or aborted); blocks released


@dataclass
class SequenceTiming:
    """Wall-clock marks (time.perf_counter seconds) for TTFT and inter-token latency."""
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Sequence:
    """Token ids, block table and progress of one completion being generated."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 sampling_params, generator: torch.Generator | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index                       # which of the request's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.token_ids: list[int] = list(prompt_token_ids)   # prompt + output, kept in sync
        self.sampling_params = sampling_params
        self.generator = generator               # per-request RNG (seeded requests), or None
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None    # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # stop token id or stop string that ended it
        # KV bookkeeping (owned by BlockManager / Scheduler)
        self.block_table: list[int] = []
        self.num_computed_tokens = 0             # tokens whose K/V are in the cache
        self.num_cached_tokens = 0               # of those, taken from the prefix cache (first schedule)
        self.num_hashed_blocks = 0               # leading full blocks registered in the prefix cache
        self.last_block_hash: int | None = None  # chain value of block num_hashed_blocks - 1
        self.num_preemptions = 0
        self.num_pending_forks = 0               # siblings to fork once the prompt is prefilled
        # speculative decoding: draft tokens proposed for this step, and draft-cache progress
        self.spec_token_ids: list[int] = []
        self.draft_computed_tokens = 0
        # output state (owned by the engine's detokenizer)
        self.logprobs: list[dict] | None = [] if sampling_params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.text = ""                           # detokenized output with the stop text removed
        self.out_bytes = b""                     # bytes of output tokens not yet valid UTF-8 text
        self.stream_offset = 0                   # chars of `text` already safe to show
        self.timing = SequenceTiming()

    # -- sizes ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget every cached K/V; prompt + output re-prefill later."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.last_block_hash = None
        self.spec_token_ids = []
        self.draft_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    def fork(self, seq_id: int, index: int, generator: torch.Generator | None) -> "Sequence":
        """A sibling sharing everything computed so far (the caller increfs the blocks)."""
        child = Sequence(seq_id, self.request_id, index, self.prompt_token_ids, self.sampling_params, generator)
        child.output_token_ids = list(self.output_token_ids)
        child.token_ids = list(self.token_ids)
        child.status = self.status
        child.block_table = list(self.block_table)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.num_hashed_blocks = self.num_hashed_blocks
        child.last_block_hash = self.last_block_hash
        child.draft_computed_tokens = self.draft_computed_tokens
        child.timing = SequenceTiming(arrival=self.timing.arrival, first_scheduled=self.timing.first_scheduled)
        return child
