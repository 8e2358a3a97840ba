"""`LLM`: offline generation over the engine's step loop (vLLM's `LLM` API).

    llm = LLM("runs/tiny", kv_cache_tokens=8192)
    llm = LLM("runs/tiny", kv_cache_dtype="int8")   # K/V as int8 + a scale per token and head (paged_cache.py)
    outs = llm.generate(["a", "b"], SamplingParams(temperature=0.8, max_tokens=64, seed=0))
    outs[0].outputs[0].text; llm.stats(); llm.beam_search(["a"], beam_width=4, max_tokens=16)
    llm.update_weights(policy)       # RL: new weights in place, prefix cache dropped
    llm = LLM("runs/base", lora={"sql": "adapters/sql", "chat": "adapters/chat"})  # lora.py
    llm.generate(prompts, params, lora_request=["sql", None, "chat"])   # one per prompt, None = base

Every request is validated before any is queued, so a bad prompt fails the call at once
instead of after the others have run. A request that fails later, inside the engine (a
fault while handling its tokens), comes back finished with `RequestOutput.error` set; the
others are unaffected.
"""
from __future__ import annotations

from lmstack.infer.engine import LLMEngine, RequestError
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.sampling_params import SamplingParams
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


def _per_prompt(value, n: int, what: str) -> list:
    """One value for every prompt, or a list/tuple with one per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise RequestError(f"got {n} prompts but {len(value)} {what}; pass one {what} or one per prompt")
        return list(value)
    return [value] * n


class LLM:
    def __init__(self, model, tokenizer=None, block_size: int = 16, kv_cache_tokens: int | None = None,
                 kv_cache_bytes: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, speculative: dict | None = None,
                 device: str = "auto", dtype=None, lora: dict | None = None, kv_cache_dtype: str = "auto"):
        self.engine = LLMEngine(model, tokenizer, block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                                kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens,
                                enable_prefix_caching=enable_prefix_caching, speculative=speculative,
                                device=device, dtype=dtype, lora=lora, kv_cache_dtype=kv_cache_dtype)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.model

    @property
    def lora_names(self) -> list[str]:
        return self.engine.lora_names

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_request=None) -> list[RequestOutput]:
        """`lora_request`: the adapter every prompt runs with (a name or a LoRARequest; None =
        the base), or a list with one per prompt (vLLM's argument)."""
        prompts = normalize_prompts(prompts)
        params = _per_prompt(sampling_params, len(prompts), "SamplingParams")
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        checked = []
        for i, (p, sp, lr) in enumerate(zip(prompts, params, loras)):
            try:
                checked.append(self.engine.check_request(p, sp, lr))
            except RequestError as e:
                raise RequestError(f"prompt {i}: {e}") from None
        ids = [self.engine.add_request(c) for c in checked]
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

    def update_weights(self, weights) -> None:
        """New weights in place (a state dict, possibly partial, or a module with the same
        state-dict names); see `LLMEngine.update_weights`."""
        self.engine.update_weights(weights)

    def stats(self) -> dict:
        return self.engine.stats()
