"""What `LLM.generate` and `AsyncLLM.generate` return (vLLM's output classes, same fields).

    RequestOutput(request_id, prompt, prompt_token_ids, outputs=[CompletionOutput ...],
                  finished, num_cached_tokens, metrics)
    CompletionOutput(index, text, token_ids, finish_reason, logprobs, cumulative_logprob)
    Logprob(logprob, rank, decoded_token)

`CompletionOutput.logprobs` is None unless `SamplingParams.logprobs` was set; then one dict
per generated token mapping token id -> Logprob, holding the chosen token and the top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = most likely
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" | None while running
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None   # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)   # arrival/ttft/itl/tokens_per_s ... (seconds)
