"""Beam search on top of `LLM.generate`, with Hugging Face's semantics.

Like vLLM's `LLM.beam_search`, the engine is asked for one token at a time: every live
beam is sent as a token-id prompt with `SamplingParams(temperature=0, max_tokens=1,
logprobs=2 * beam_width)`, and the top-2W log-probabilities of each beam are all beam
search needs. Prefix caching makes re-sending a beam's prompt cheap: only its newest
token and the partial last block are prefilled again.

The bookkeeping follows `transformers`' `generate(num_beams=W, do_sample=False)`, so the
two give the same beams on the same weights:

* each step the best 2W continuations over all beams (by summed log-probability) are
  considered in order; a continuation ending in EOS, or reaching max_tokens, is a
  finished hypothesis if it is among the best W, scored sum_logprob / len ** length_penalty
  (len = generated tokens, EOS included); the best W unfinished ones are the next beams;
* the W best-scoring finished hypotheses are kept;
* a prompt stops when W hypotheses are finished and `early_stopping=True`, or when the
  best live beam can no longer beat the worst kept hypothesis: its score is estimated at
  the current length (`early_stopping=False`) or, with "never" and length_penalty > 0, at
  max_tokens.

`beam_search_ids` runs the algorithm against any `step_fn`, so it is testable without
an engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from lmstack.infer.sampling_params import MAX_LOGPROBS, SamplingParams

# step_fn(token_id_lists) -> one {token_id: logprob} per list, covering at least its top-2W tokens
StepFn = Callable[[list[list[int]]], list[dict[int, float]]]


@dataclass
class BeamSearchSequence:
    tokens: list[int]          # prompt + generated ids (vLLM's convention)
    num_prompt_tokens: int
    cum_logprob: float         # sum of the generated tokens' log-probabilities
    score: float               # cum_logprob / len(token_ids) ** length_penalty
    finish_reason: str         # "stop" (ended with EOS) or "length"
    text: str | None = None    # decoded generated tokens, when a tokenizer is known

    @property
    def token_ids(self) -> list[int]:
        """The generated ids only."""
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)  # best score first


@dataclass
class _Beam:
    generated: list[int]
    cum_logprob: float


class _PromptState:
    """One prompt's live beams and its best finished hypotheses."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt
        self.beams = [_Beam([], 0.0)]
        self.finished: list[tuple[float, _Beam, str]] = []   # (score, beam, finish_reason), best first
        self.done = False


def beam_search_ids(step_fn: StepFn, prompts: Sequence[Sequence[int]], beam_width: int = 4,
                    max_tokens: int = 16, length_penalty: float = 1.0, early_stopping: bool | str = False,
                    eos_token_id: int | None = None, ignore_eos: bool = False) -> list[BeamSearchOutput]:
    """Beam search over token-id prompts; step_fn scores the next token of many sequences at once."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if 2 * beam_width > MAX_LOGPROBS:
        raise ValueError(f"beam_width must be <= {MAX_LOGPROBS // 2} (it needs 2 * beam_width logprobs), "
                         f"got {beam_width}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    W, K = beam_width, 2 * beam_width
    stop_on_eos = eos_token_id is not None and not ignore_eos
    states = [_PromptState([int(t) for t in p]) for p in prompts]
    for step in range(max_tokens):
        live = [s for s in states if not s.done]
        if not live:
            break
        queries = [s.prompt + b.generated for s in live for b in s.beams]
        scored = iter(step_fn(queries))
        length = step + 1                                     # generated tokens after this step
        for s in live:
            # The best K continuations over all beams, best first.
            cands = [(b.cum_logprob + lp, b, tok) for b in s.beams for tok, lp in next(scored).items()]
            cands.sort(key=lambda c: c[0], reverse=True)
            cands = cands[:K]
            next_beams = []
            for rank, (cum, beam, tok) in enumerate(cands):
                hits_eos = stop_on_eos and tok == eos_token_id
                if hits_eos or length == max_tokens:
                    if rank < W:                              # only the top W may finish
                        s.finished.append((cum / length ** length_penalty, _Beam(beam.generated + [tok], cum),
                                           "stop" if hits_eos else "length"))
                elif len(next_beams) < W:
                    next_beams.append(_Beam(beam.generated + [tok], cum))
            s.finished.sort(key=lambda f: f[0], reverse=True)
            del s.finished[W:]
            s.beams = next_beams
            s.done = _is_done(s, W, length, max_tokens, length_penalty, early_stopping,
                              all_hit=len(next_beams) == 0)
    outs = []
    for s in states:
        seqs = [BeamSearchSequence(s.prompt + b.generated, len(s.prompt), b.cum_logprob, score, reason)
                for score, b, reason in s.finished]
        outs.append(BeamSearchOutput(seqs))
    return outs


def _is_done(s: _PromptState, W: int, length: int, max_tokens: int, length_penalty: float,
             early_stopping: bool | str, all_hit: bool) -> bool:
    if all_hit or length >= max_tokens:
        return True
    full = len(s.finished) == W
    if not full:
        return False
    if early_stopping is True:
        return True
    hypothetical = max_tokens if (early_stopping == "never" and length_penalty > 0.0) else length
    best_possible = s.beams[0].cum_logprob / hypothetical ** length_penalty
    return not best_possible > s.finished[-1][0]


def beam_search(llm, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], beam_width: int = 4,
                max_tokens: int = 16, length_penalty: float = 1.0, early_stopping: bool | str = False,
                ignore_eos: bool = False, lora_request=None) -> list[BeamSearchOutput]:
    """vLLM-style `LLM.beam_search`: prompts are strings or token-id lists; returns, per
    prompt, the `beam_width` best sequences (best first) with their decoded text.
    `lora_request`: the LoRA adapter every beam runs with (a name or LoRARequest; None = the base)."""
    if isinstance(lora_request, (list, tuple)):
        raise ValueError("beam_search: lora_request is one adapter for all prompts (a name or a LoRARequest); "
                         "run one beam_search per adapter")
    tokenizer = llm.tokenizer
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        prompts = [prompts]
    prompt_ids = []
    for p in prompts:
        if isinstance(p, str) and tokenizer is None:
            raise ValueError("beam_search: a text prompt needs a tokenizer; pass token ids instead")
        ids = tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else [int(t) for t in p]
        if not ids:
            raise ValueError("beam_search: empty prompt; give at least one token")
        prompt_ids.append(ids)
    # the engine's EOS id (LLM.engine.eos_token_id), else the tokenizer's end-of-text token
    eos = getattr(llm, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(llm, "engine", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eot_token", None)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=2 * beam_width, ignore_eos=True)

    def step_fn(queries: list[list[int]]) -> list[dict[int, float]]:
        results = llm.generate(queries, params, **({"lora_request": lora_request} if lora_request else {}))
        return [{int(t): float(lp.logprob) for t, lp in r.outputs[0].logprobs[0].items()} for r in results]

    outs = beam_search_ids(step_fn, prompt_ids, beam_width, max_tokens, length_penalty, early_stopping,
                           eos, ignore_eos)
    if tokenizer is not None:
        for out in outs:
            for seq in out.sequences:
                seq.text = tokenizer.decode(seq.token_ids)
    return outs
