"""`LLM`: offline generation over the engine's step loop (vLLM's `LLM` API).

    llm = LLM("runs/tiny", kv_cache_tokens=8192)
    llm = LLM("runs/tiny", kv_cache_dtype="int8")   # K/V as int8 + a scale per token and head (paged_cache.py)
    outs = llm.generate(["a", "b"], SamplingParams(temperature=0.8, max_tokens=64, seed=0))
    outs[0].outputs[0].text; llm.stats(); llm.beam_search(["a"], beam_width=4, max_tokens=16)
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=32))   # the model's chat template
    llm.update_weights(policy)       # RL: new weights in place, prefix cache dropped
    llm = LLM("runs/base", lora={"sql": "adapters/sql", "chat": "adapters/chat"})  # lora.py
    llm.generate(prompts, params, lora_request=["sql", None, "chat"])   # one per prompt, None = base

Every request is validated before any is queued, so a bad prompt fails the call at once
instead of after the others have run. A request that fails later, inside the engine (a
fault while handling its tokens), comes back finished with `RequestOutput.error` set; the
others are unaffected.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

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
        self._model_dir = Path(model) if isinstance(model, (str, Path)) else None
        self._template = None          # the folder's chat template, read on the first chat()
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

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False, lora_request=None, chat_template=None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} dicts) or a list of
        them -> one RequestOutput per conversation.

        The prompt is rendered by the model's chat template, as the server does
        (`encode_chat`): the model folder's Jinja template (or `chat_template`: Jinja text or a
        ChatTemplate), else lmstack's own. Generation also stops where the template ends the
        assistant's turn (that token joins each SamplingParams' stop_token_ids)."""
        from lmstack.tokenizer.chat_template import ChatTemplate, NoChatTemplate, chat_stop_token_ids, encode_chat

        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            conversations = [list(messages)]
        elif isinstance(messages, (list, tuple)) and messages:
            conversations = [list(c) for c in messages]
        else:
            raise RequestError("messages must be a conversation (a non-empty list of {'role', 'content'} dicts) "
                               "or a list of conversations")
        if self.tokenizer is None:
            raise RequestError("LLM.chat needs a tokenizer; pass LLM(..., tokenizer=...)")
        template = self._chat_template(chat_template, ChatTemplate)
        try:
            prompts = [encode_chat(c, self.tokenizer, template, add_generation_prompt) for c in conversations]
        except NoChatTemplate as e:
            raise RequestError(f"{e}; pass chat_template= (the Jinja text of a chat template)") from None
        stop = chat_stop_token_ids(self.tokenizer, template) or []
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts), "SamplingParams")
        params = [dataclasses.replace(p, stop_token_ids=p.stop_token_ids + [t for t in stop if t not in
                                                                             p.stop_token_ids]) for p in params]
        return self.generate(prompts, params, use_tqdm=use_tqdm, lora_request=lora_request)

    def _chat_template(self, given, template_cls):
        """`given` (Jinja text or a ChatTemplate), else the model folder's template (None: ours)."""
        if self._template is None:
            found = template_cls.from_pretrained(self._model_dir) if self._model_dir is not None else None
            self._template = (found,)
        folder = self._template[0]
        if given is None or isinstance(given, template_cls):
            return folder if given is None else given
        return template_cls(given, folder.special_tokens if folder is not None else None, origin="chat_template")

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
