"""Floor 2: the inference engine (paged KV cache, continuous batching, prefix caching,
speculative decoding) behind a vLLM-style API.

    from lmstack.infer import LLM, SamplingParams
    outs = LLM("runs/tiny").generate(["Once upon a time"], SamplingParams(max_tokens=32))

Files, one job each: sampling_params (SamplingParams), request (a validated request and
its tracking), sequence (one completion's tokens and progress), block_manager (KV block ids,
block tables, refcounts, prefix hashes; no tensors), scheduler (continuous batching,
chunked prefill, preemption), paged_cache + runner (scheduled seqs -> tensors -> model ->
logits), sampler (logits -> tokens, logprobs), postprocess (tokens -> stops, text; per-
request faults), detokenizer (incremental text), speculative + ngram + rejection (draft
model / n-gram proposals, exact verification), weights (in-place weight updates), lora
(several LoRA adapters over one base, chosen per request), engine (the step loop), llm
(offline API), async_engine (the server's API), beam_search.
"""
from lmstack.infer.engine import LLMEngine, RequestError
from lmstack.infer.llm import LLM
from lmstack.infer.lora import LoRAError, LoRARequest
from lmstack.infer.outputs import CompletionOutput, Logprob, RequestOutput
from lmstack.infer.request import EngineRequest
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.weights import WeightsError


def __getattr__(name: str):
    if name == "AsyncLLM":  # imports asyncio/threading machinery only when used
        from lmstack.infer.async_engine import AsyncLLM
        return AsyncLLM
    raise AttributeError(f"module 'lmstack.infer' has no attribute {name!r}")


__all__ = ["LLM", "AsyncLLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestError", "EngineRequest", "WeightsError", "LoRARequest", "LoRAError"]
