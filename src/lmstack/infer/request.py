"""A request as the engine sees it: validated at the door, then tracked until it finishes.

    req = engine.check_request("Hello", SamplingParams(max_tokens=8))   # EngineRequest, or RequestError
    engine.add_request(req, request_id="r1")                            # -> RequestState inside

`EngineRequest` is what validation produces (the prompt's text and token ids, the
parameters); `AsyncLLM` validates in the caller's thread and hands it to the engine thread,
`LLM.generate` validates every prompt before queueing any. `RequestState` is the engine's
record of one request: its sequences (n completions), one incremental detokenizer per
completion, and how it ended (finished, aborted, or failed with an error). It builds the
`RequestOutput` the caller sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.infer.detokenizer import IncrementalDetokenizer
from lmstack.infer.lora import LoRARequest
from lmstack.infer.outputs import CompletionOutput, RequestOutput
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.sequence import Sequence


@dataclass(frozen=True)
class EngineRequest:
    """A request that passed `LLMEngine.check_request`."""
    prompt: str | None                 # the text, when the prompt was given as text
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None = None   # its adapter, resolved (name, id, path); None = the base


@dataclass
class RequestState:
    request_id: str
    request: EngineRequest
    seqs: list[Sequence] = field(default_factory=list)
    detoks: dict[int, IncrementalDetokenizer] = field(default_factory=dict)   # completion index -> text
    aborted: bool = False
    error: str | None = None           # set when a fault in this request ended it

    @property
    def finished(self) -> bool:
        if self.aborted or self.error is not None:
            return True
        return len(self.seqs) == self.request.params.n and all(s.is_finished for s in self.seqs)

    def add_seq(self, seq: Sequence, detok: IncrementalDetokenizer) -> None:
        self.seqs.append(seq)
        self.detoks[seq.index] = detok

    def output(self) -> RequestOutput:
        comps = []
        for seq in sorted(self.seqs, key=lambda s: s.index):
            comps.append(CompletionOutput(
                index=seq.index, text=self.detoks[seq.index].visible_text(seq.is_finished),
                token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob, stop_reason=seq.stop_reason))
        scored = self.seqs[0].prompt_logprobs
        return RequestOutput(self.request_id, self.request.prompt, self.request.prompt_token_ids, comps,
                             self.finished, self.seqs[0].num_cached_tokens, request_metrics(self.seqs),
                             error=self.error, prompt_logprobs=list(scored) if scored is not None else None,
                             lora_request=self.request.lora_request)


def request_metrics(seqs: list[Sequence]) -> dict:
    """TTFT, inter-token latency and tokens/s of a request (seconds; None until known)."""
    t = seqs[0].timing
    firsts = [s.timing.first_token for s in seqs if s.timing.first_token is not None]
    first = min(firsts) if firsts else None
    n_gen = sum(s.num_output_tokens for s in seqs)
    done = all(s.timing.finished is not None for s in seqs)
    last = max((s.timing.last_token for s in seqs if s.timing.last_token is not None), default=None)
    n0 = seqs[0].num_output_tokens
    itl = ((t.last_token - t.first_token) / (n0 - 1)) if n0 > 1 and t.first_token is not None else None
    return {
        "arrival_time": t.arrival, "first_scheduled_time": t.first_scheduled, "first_token_time": first,
        "time_to_first_token": (first - t.arrival) if first is not None else None,
        "inter_token_latency": itl, "num_generated_tokens": n_gen,
        "finished_time": max(s.timing.finished for s in seqs) if done else None,
        "tokens_per_s": n_gen / (last - t.arrival) if last is not None and last > t.arrival else None,
        "num_preemptions": sum(s.num_preemptions for s in seqs),
    }
