"""One completion's state inside the engine: its tokens, progress and outcome.

A user request with `n` completions starts as one `Sequence`. When its prompt has been
prefilled, the engine forks `n - 1` siblings that share the prompt's KV blocks (the block
manager counts references and copies a shared block on first write). Each sibling is then
an independent sequence that the scheduler runs, preempts and finishes on its own.

Positions: the sequence's tokens are `prompt_token_ids + output_token_ids`; the first
`num_computed_tokens` of them have K/V in the cache. Decoding means exactly one token is
uncomputed (the one just sampled); prefilling means more than one.

What is *not* here, on purpose (each state has one owner): the KV block table and the
prefix-hash progress live in the BlockManager (keyed by `seq_id`), the detokenized text in
the request's incremental detokenizers (request.py), the draft model's progress in the
DraftSpeculator. A sequence is the tokens; others keep what they decide about them.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # queued (new or preempted); holds no KV blocks
    RUNNING = "running"        # holds KV blocks; scheduled each step until finished
    FINISHED = "finished"      # done (stop, length, abort or error); blocks released


@dataclass
class SequenceTiming:
    """Wall-clock marks (time.perf_counter seconds) for TTFT and inter-token latency."""
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Sequence:
    """Token ids, progress and outcome of one completion being generated."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 sampling_params, generator: torch.Generator | None = None, lora_id: int = 0):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index                       # which of the request's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.token_ids: list[int] = list(prompt_token_ids)   # prompt + output, kept in sync
        self.sampling_params = sampling_params
        self.generator = generator               # per-request RNG (seeded requests), or None
        self.lora_id = lora_id                   # the request's LoRA adapter (infer/lora.py); 0 = the base
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None    # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None  # stop token id or stop string that ended it
        # progress (owned by the Scheduler)
        self.num_computed_tokens = 0             # tokens whose K/V are in the cache
        self.num_cached_tokens = 0               # of those, taken from the prefix cache (first schedule)
        self.num_preemptions = 0
        self.num_pending_forks = 0               # siblings to fork once the prompt is prefilled
        # speculative decoding: draft tokens proposed for this step (fed after the last token)
        self.spec_token_ids: list[int] = []
        # sampled-token log-probabilities (only when the request asks for logprobs, as in vLLM)
        wants_logprobs = sampling_params.logprobs is not None
        self.logprobs: list[dict] | None = [] if wants_logprobs else None
        self.cumulative_logprob: float | None = 0.0 if wants_logprobs else None
        # prompt tokens' log-probabilities (prompt_logprobs): entry i is prompt token i's; None
        # for token 0 and the tokens before prompt_logprobs_start; grows as the prompt prefills
        self.prompt_logprobs: list[dict | None] | None = None
        if sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * max(1, sampling_params.prompt_logprobs_start)
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
    def next_scored_position(self) -> int | None:
        """prompt_logprobs: the position whose logits score the next unscored prompt token
        (logits at p score token p + 1); None when not asked for or every token is scored."""
        lps = self.prompt_logprobs
        if lps is None or len(lps) >= self.num_prompt_tokens:
            return None
        return len(lps) - 1

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute (its blocks are already freed): prompt + output re-prefill later."""
        self.num_computed_tokens = 0
        self.spec_token_ids = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    def fork(self, seq_id: int, index: int, generator: torch.Generator | None) -> "Sequence":
        """A sibling sharing everything computed so far (the block manager shares the blocks)."""
        child = Sequence(seq_id, self.request_id, index, self.prompt_token_ids, self.sampling_params, generator,
                         self.lora_id)
        child.output_token_ids = list(self.output_token_ids)
        child.token_ids = list(self.token_ids)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        if self.prompt_logprobs is not None:      # forked once the prompt is scored: share the scores
            child.prompt_logprobs = list(self.prompt_logprobs)
        child.timing = SequenceTiming(arrival=self.timing.arrival, first_scheduled=self.timing.first_scheduled)
        return child
