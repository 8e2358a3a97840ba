"""What `LLM.generate` and `AsyncLLM.generate` return (vLLM's output classes, same fields).

    RequestOutput(request_id, prompt, prompt_token_ids, outputs=[CompletionOutput ...],
                  finished, num_cached_tokens, metrics, error, prompt_logprobs, lora_request)
    CompletionOutput(index, text, token_ids, finish_reason, logprobs, cumulative_logprob, stop_reason)
    Logprob(logprob, rank, decoded_token)

`CompletionOutput.logprobs` is None unless `SamplingParams.logprobs` was set; then one dict
per generated token mapping token id -> Logprob, holding the chosen token and the top-k
(from the distribution `SamplingParams.logprobs_mode` names; alternatives the processing
removed, with logprob -inf, are left out). `cumulative_logprob` is their sum (None without
logprobs, as in vLLM).

`RequestOutput.prompt_logprobs` is None unless `SamplingParams.prompt_logprobs` was set; then
one entry per prompt token: None for the first token (nothing predicts it) and for tokens
before `prompt_logprobs_start`, else a dict holding that prompt token's Logprob (log p(token |
the tokens before it), raw) and the top-k at its position (with prompt_logprobs=-1, a
`VocabLogprobs` mapping over the whole vocabulary). Filled as the prompt is prefilled.

Errors. A fault while handling one request (say its tokenizer raising on a sampled id)
ends that request alone: `RequestOutput.error` holds the message ("ExcType: text"),
`finished` is True, and its unfinished completions get `finish_reason="error"`. The other
requests of the batch go on. A server maps `error is not None` to a 5xx (it is the
engine's fault, not the client's: bad requests are refused earlier with `RequestError`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmstack.infer.lora import LoRARequest


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = most likely
    decoded_token: str | None = None


class VocabLogprobs(Mapping):
    """One position's Logprob for every token of the vocabulary (prompt_logprobs=-1), a
    read-only dict made on access: V objects per position cost more than the forward of a
    small model (and a full garbage collection). `row`: (V,) log-probabilities; rank is 1 +
    the number of tokens more likely, as for the dicts."""
    __slots__ = ("_row", "_decode")

    def __init__(self, row, decode):
        self._row, self._decode = row, decode

    def __getitem__(self, token_id: int) -> Logprob:
        if not isinstance(token_id, int) or not 0 <= token_id < len(self):
            raise KeyError(token_id)
        value = self._row[token_id]
        return Logprob(float(value), int((self._row > value).sum()) + 1, self._decode(token_id))

    def __iter__(self):
        return iter(range(len(self)))

    def __len__(self) -> int:
        return int(self._row.shape[0])


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" | None while running
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
    error: str | None = None         # "ExcType: message" when a fault ended this request (-> HTTP 5xx)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None   # per prompt token; see above
    lora_request: "LoRARequest | None" = None   # the adapter it ran with (infer/lora.py); None = the base
