"""SamplingParams: how one request wants its tokens chosen and when it stops.

Names and defaults follow vLLM's `SamplingParams`, so code written against vLLM runs
against lmstack by swapping one import:

    from lmstack.infer import SamplingParams
    SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, stop=["\\n"], seed=0)

Every field is checked in `__post_init__`: a bad value raises `ValueError` naming the
field, the value and the valid range, before any work is queued. `dataclasses.replace`
re-runs the checks. The sampler (`sampler.py`) reads these fields; the engine's
postprocessing (`postprocess.py`) reads the stopping fields (stop, stop_token_ids,
include_stop_str_in_output, ignore_eos, max_tokens, min_tokens).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

# Below this temperature a request is treated as greedy (vLLM uses the same epsilon):
# dividing logits by ~0 would overflow, and the limit of softmax(l / T) as T -> 0 is argmax.
SAMPLING_EPS = 1e-5

MAX_LOGPROBS = 20  # top-k logprobs per token, like OpenAI's API limit

# Which distribution reported logprobs come from (vLLM's `logprobs_mode` values):
#   raw_logprobs        the model's, after the penalties only (before temperature/truncation)
#   processed_logprobs  the one the token is drawn from: after penalties, min_tokens,
#                       temperature, top-k, top-p, min-p (what RL's importance ratios need)
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


def _check_number(name: str, value, *, integer: bool = False) -> None:
    ok = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if not ok or isinstance(value, bool):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"SamplingParams.{name} must be {kind}, got {value!r} ({type(value).__name__})")


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options (vLLM names and defaults).

    n                   number of completions returned for the prompt (they share its KV blocks)
    temperature         0 = greedy argmax; otherwise logits are divided by it before softmax
    top_p               keep the smallest set of tokens whose probability sums to >= top_p
    top_k               keep the k most likely tokens; 0 or -1 = off
    min_p               drop tokens with p < min_p * p(most likely token); 0 = off
    presence_penalty    subtracted once from the logit of every token already generated
    frequency_penalty   subtracted from a logit once per time that token was generated
    repetition_penalty  CTRL-style, over prompt + generated tokens: positive logits are
                        divided by it, negative ones multiplied; 1 = off
    seed                per-request RNG seed: same seed -> same output whatever the batch
    stop                strings that end the completion (the stop text is not returned,
                        unless include_stop_str_in_output)
    stop_token_ids      token ids that end the completion (the token is not in the text)
    include_stop_str_in_output  keep the stop string that ended the completion at the end of
                        its text (the text after it, within the same token, is still dropped)
    ignore_eos          keep generating past the end-of-text token
    max_tokens          most tokens generated; None = up to the model's context length
    min_tokens          EOS and stop_token_ids are blocked until this many tokens exist
    logprobs            None = off; k = the chosen token's logprob plus the k most likely
    logprobs_mode       "raw_logprobs" (default): log_softmax of the penalized logits, before
                        temperature and truncation; "processed_logprobs": log_softmax of the
                        logits the token is drawn from (after penalties, min_tokens,
                        temperature, top-k, top-p, min-p; greedy rows: after penalties and
                        min_tokens). Applies to the chosen token, the top-k alternatives and
                        cumulative_logprob
    skip_special_tokens drop special tokens when detokenizing
    prompt_logprobs     None = off; k = for each prompt token, its logprob given the tokens
                        before it plus the k most likely tokens at that position, in
                        `RequestOutput.prompt_logprobs` (entry 0 is None, as in vLLM). Always
                        the model's raw distribution (no penalties, no temperature). -1 = the
                        whole vocabulary at each scored position (vLLM's -1; the evaluation
                        harness reads every one-token choice of a context from one row)
    prompt_logprobs_start  (lmstack's, like SGLang's logprob_start_len) the first prompt
                        position scored; entries before it are None. Tokens before position
                        start - 1 need no logits, so the prefix cache may serve them: scoring
                        several continuations of one context computes the context once. With
                        0 (every token scored, as in vLLM) the request skips the prefix cache
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    logprobs_mode: str = "raw_logprobs"
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0

    def __post_init__(self) -> None:
        _check_number("n", self.n, integer=True)
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        _check_number("temperature", self.temperature)
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        _check_number("top_k", self.top_k, integer=True)
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
        if self.max_tokens is not None:
            _check_number("max_tokens", self.max_tokens, integer=True)
            if self.max_tokens < 1:
                raise ValueError(f"SamplingParams.max_tokens must be >= 1 or None, got {self.max_tokens}")
        _check_number("min_tokens", self.min_tokens, integer=True)
        if self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens must be <= max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}")
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, integer=True)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"SamplingParams.logprobs must be None or in [0, {MAX_LOGPROBS}], "
                                 f"got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_number("prompt_logprobs", self.prompt_logprobs, integer=True)
            if not -1 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"SamplingParams.prompt_logprobs must be None, -1 (whole vocabulary) or in "
                                 f"[0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        _check_number("prompt_logprobs_start", self.prompt_logprobs_start, integer=True)
        if self.prompt_logprobs_start < 0:
            raise ValueError(f"SamplingParams.prompt_logprobs_start must be >= 0, got {self.prompt_logprobs_start}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"SamplingParams.logprobs_mode must be one of {list(LOGPROBS_MODES)}, "
                             f"got {self.logprobs_mode!r}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError(f"SamplingParams.include_stop_str_in_output must be True or False, "
                             f"got {self.include_stop_str_in_output!r}")
        self.stop = self._normalize_stop(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise ValueError(f"SamplingParams.stop_token_ids must be a list of ints >= 0, "
                                 f"got {self.stop_token_ids!r}")
            ids = list(self.stop_token_ids)
            for t in ids:
                if not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 0:
                    raise ValueError(f"SamplingParams.stop_token_ids must be a list of ints >= 0, got {ids!r}")
            self.stop_token_ids = [int(t) for t in ids]

    @staticmethod
    def _normalize_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"SamplingParams.stop must be a string or a list of strings, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"SamplingParams.stop must contain non-empty strings only, got {stop!r}")
        return list(stop)

    # Derived views the sampler and engine use -------------------------------------------

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax token (temperature ~ 0)."""
        return self.temperature < SAMPLING_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def processed_logprobs(self) -> bool:
        return self.logprobs_mode == "processed_logprobs"

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
