"""`LLM`: offline generation over the engine's step loop (vLLM's `LLM` API).

    llm = LLM("runs/tiny", kv_cache_tokens=8192)
    outs = llm.generate(["a", "b"], SamplingParams(temperature=0.8, max_tokens=64, seed=0))
    outs[0].outputs[0].text; llm.stats(); llm.beam_search(["a"], beam_width=4, max_tokens=16)

Every request is validated before any is queued, so a bad prompt fails the call at once
instead of after the others have run.
"""
from __future__ import annotations

from lmstack.infer.engine import LLMEngine, RequestError
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.sampling import SamplingParams
from lmstack.utils.progress import progress


def normalize_prompts(prompts) -> list:
    """str | list[str] | list[int] | list[list[int]] -> list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise RequestError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                       f"got {type(prompts).__name__}")


class LLM:
    def __init__(self, model, tokenizer=None, block_size: int = 16, kv_cache_tokens: int | None = None,
                 kv_cache_bytes: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, speculative: dict | None = None,
                 device: str = "auto", dtype=None):
        self.engine = LLMEngine(model, tokenizer, block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                                kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching, speculative=speculative,
                                device=device, dtype=dtype)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.model

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = normalize_prompts(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise RequestError(f"got {len(prompts)} prompts but {len(sampling_params)} SamplingParams; "
                                   f"pass one SamplingParams or one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        checked = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                checked.append(self.engine.check_request(p, sp))
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}") from None
        ids = [self.engine.add_request(None, checked=c) for c in checked]
        pending = set(ids)
        final: dict[str, RequestOutput] = {}
        bar = progress(total=len(ids), desc="generate", disable=None if use_tqdm else True)
        try:
            while pending:
                for out in self.engine.step(emit_unfinished=False):
                    if out.finished and out.request_id in pending:
                        final[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        except BaseException:
            for rid in pending:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [final[rid] for rid in ids]

    def beam_search(self, prompts, beam_width: int = 4, max_tokens: int = 16, **kwargs):
        """Beam search (S's `beam_search.py`) on top of this engine's generate."""
        from lmstack.infer.beam_search import beam_search
        return beam_search(self, prompts, beam_width=beam_width, max_tokens=max_tokens, **kwargs)

    def stats(self) -> dict:
        return self.engine.stats()
