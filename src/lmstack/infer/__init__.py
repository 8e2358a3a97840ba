"""Floor 2: the inference engine (paged KV cache, continuous batching, prefix caching,
speculative decoding) behind a vLLM-style API.

    from lmstack.infer import LLM, SamplingParams
    outs = LLM("runs/tiny").generate(["Once upon a time"], SamplingParams(max_tokens=32))

Files, one job each: sequence (a request's state), block_manager (KV block ids, refcounts,
prefix hashes; no tensors), scheduler (continuous batching, chunked prefill, preemption),
paged_cache + runner (block tables -> tensors -> model -> logits), sampling/sampler (S),
detokenizer (incremental text, stop strings), speculative (draft model / n-gram),
engine (the step loop), llm (offline API), async_engine (the server's API).
"""
from lmstack.infer.engine import LLMEngine, RequestError
from lmstack.infer.llm import LLM
from lmstack.infer.outputs import CompletionOutput, Logprob, RequestOutput
from lmstack.infer.sampling import SamplingParams


def __getattr__(name: str):
    if name == "AsyncLLM":  # imports asyncio/threading machinery only when used
        from lmstack.infer.async_engine import AsyncLLM
        return AsyncLLM
    raise AttributeError(f"module 'lmstack.infer' has no attribute {name!r}")


__all__ = ["LLM", "AsyncLLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestError"]
