"""The step loop: requests in, one batched forward per step, tokens out.

    from lmstack.infer import LLM, SamplingParams
    llm = LLM("runs/tiny")                       # or a HF folder, or a Transformer + tokenizer=
    outs = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text, llm.stats())
    llm.update_weights(policy.state_dict())      # RL: the next rollouts sample the new policy
    llm = LLM("runs/base", lora={"sql": "adapters/sql"})    # several LoRA adapters, one batch (lora.py)
    llm.generate(prompts, params, lora_request="sql")

`LLMEngine.step()` reads as the engine does: (speculative proposals) -> schedule (scheduler)
-> run the scheduled rows through the model (runner) -> sample or verify, append tokens,
detokenize, check stops, free finished sequences (postprocess) -> outputs of the requests
that moved. `LLM.generate` (offline, llm.py) loops it until its requests finish; `AsyncLLM`
(async_engine.py) runs the same loop in a background thread.

CPU note: a tiny model's ops are too small to split across threads; on a busy machine two
intra-op threads that wait for each other made a decode step up to ~10x slower than one
thread (`torch.set_num_threads(1)`). The engine leaves that global setting to the caller.
"""
from __future__ import annotations

import itertools
import math
import time
import uuid

import torch

from lmstack.infer import loader
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.detokenizer import Detokenizer
from lmstack.infer.lora import LoRAAdapters, LoRAError, LoRARequest
from lmstack.infer.outputs import RequestOutput
from lmstack.infer.paged_cache import PagedKVCache, check_kv_cache_dtype
from lmstack.infer.postprocess import Postprocessor
from lmstack.infer.request import EngineRequest, RequestState
from lmstack.infer.runner import ModelRunner
from lmstack.infer.sampler import make_generator
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.scheduler import Scheduler
from lmstack.infer.sequence import Sequence
from lmstack.infer.weights import copy_weights, match_weights
from lmstack.utils import LmstackError, pick_device, pick_dtype


class RequestError(LmstackError, ValueError):
    """A request the engine cannot serve (bad prompt or parameters); other requests go on."""


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LmstackError(f"LLM({name}={value!r}): must be a positive int")


class LLMEngine:
    def __init__(self, model, tokenizer=None, block_size: int = 16, kv_cache_tokens: int | None = None,
                 kv_cache_bytes: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, speculative: dict | None = None,
                 device: str = "auto", dtype=None, lora: dict | None = None, kv_cache_dtype: str = "auto"):
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            _positive_int(name, v)
        check_kv_cache_dtype(kv_cache_dtype)    # "auto" (the model's dtype) or "int8" (paged_cache.py)
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        dt = pick_dtype(dtype) if isinstance(dtype, str) else dtype
        self.model, self.tokenizer, self.eos_token_id = loader.load(model, tokenizer, self.device, dt)
        cfg = loader.model_config(self.model)
        if getattr(cfg, "mask", "causal") != "causal":
            raise LmstackError(f"the engine generates with causal models; this model has mask={cfg.mask!r}")
        self.model_config = cfg
        # adapters served over this base (checked and installed before any cache is allocated)
        self.lora = LoRAAdapters(self.model, lora) if lora else None
        self.max_model_len = cfg.context_length
        self.vocab_size = cfg.vocab_size
        # the compute dtype: the first float tensor's (a quantized model also holds integer ones)
        cache_dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        per_token = PagedKVCache.bytes_per_token(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, cache_dtype,
                                                 kv_cache_dtype)
        num_blocks = self._num_blocks(block_size, kv_cache_tokens, kv_cache_bytes, per_token, max_num_seqs)
        self.cache = PagedKVCache(cfg.n_layer, num_blocks, block_size, cfg.n_kv_head, cfg.head_dim,
                                  cache_dtype, self.device, kv_cache_dtype)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(self.model, self.cache, self.block_manager, self.device,
                                  self.lora.batch if self.lora is not None else None)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.speculator = None
        if speculative:
            from lmstack.infer.speculative import make_speculator
            self.speculator = make_speculator(speculative, block_manager=self.block_manager,
                                              max_model_len=self.max_model_len, vocab_size=self.vocab_size,
                                              eos_token_id=self.eos_token_id, device=self.device,
                                              dtype=cache_dtype)
        self._seq_ids = itertools.count()
        self.postprocessor = Postprocessor(self.scheduler, self.detokenizer, self.eos_token_id, self.max_model_len,
                                           self.device, lambda: next(self._seq_ids), self.speculator)
        self.requests: dict[str, RequestState] = {}
        self.counters = {"steps": 0, "prompt_tokens": 0, "step_time_s": 0.0, "last_step_tokens": 0,
                         "last_step_time_s": 0.0, "finished_requests": 0, "kv_peak_blocks_used": 0,
                         "kv_waste_at_peak": 0.0, "weight_updates": 0}

    def _num_blocks(self, block_size, kv_tokens, kv_bytes, per_token, max_num_seqs) -> int:
        """KV cache size in blocks, from tokens or bytes (default: every seq at full length,
        capped at 2 GiB on CPU / half the free memory on a GPU)."""
        need = math.ceil(self.max_model_len / block_size)    # one max-length request
        if kv_tokens is not None and kv_bytes is not None:
            raise LmstackError("give kv_cache_tokens or kv_cache_bytes, not both")
        if kv_tokens is not None:
            _positive_int("kv_cache_tokens", kv_tokens)
            blocks = kv_tokens // block_size
        elif kv_bytes is not None:
            _positive_int("kv_cache_bytes", kv_bytes)
            blocks = kv_bytes // (per_token * block_size)
        else:
            cap = 2 << 30
            if self.device.type == "cuda":
                cap = torch.cuda.mem_get_info(self.device)[0] // 2
            blocks = max(need, min(max_num_seqs * need, cap // (per_token * block_size)))
        if blocks < need:
            raise LmstackError(
                f"KV cache of {blocks} blocks x {block_size} tokens = {blocks * block_size} tokens cannot hold one "
                f"request of the model's context_length={self.max_model_len}; raise kv_cache_tokens to >= "
                f"{need * block_size} (or kv_cache_bytes to >= {need * block_size * per_token})")
        return blocks

    # -- requests -------------------------------------------------------------------------
    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass LLM(..., tokenizer=...) or token ids")
            return prompt, self.tokenizer.encode(prompt, allowed_special="all")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
            return None, list(prompt)
        raise RequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")

    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters served over the base, in id order (ids 1, 2, ...)."""
        return self.lora.names if self.lora is not None else []

    def check_request(self, prompt, params: SamplingParams | None = None, lora_request=None) -> EngineRequest:
        """Validate one request at the door; raises RequestError naming the problem.
        `lora_request`: None (the base), an adapter name, or a LoRARequest (lora.py)."""
        lora = self._resolve_lora(lora_request)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                               f"(with room for >= 1 generated token); shorten the prompt to <= "
                               f"{self.max_model_len - 1} tokens")
        if params.prompt_logprobs is not None and params.prompt_logprobs_start >= len(ids):
            raise RequestError(f"SamplingParams.prompt_logprobs_start={params.prompt_logprobs_start} is past the "
                               f"prompt's last token (the prompt has {len(ids)} tokens); use 0..{len(ids) - 1}")
        if params.n > self.scheduler.max_num_seqs:
            raise RequestError(f"SamplingParams.n={params.n} exceeds max_num_seqs={self.scheduler.max_num_seqs}")
        return EngineRequest(text, ids, params, lora)

    def _resolve_lora(self, lora_request) -> LoRARequest | None:
        if lora_request is None:
            return None
        if self.lora is None:
            raise RequestError(f"lora_request={lora_request!r}, but this engine serves no LoRA adapters; build it "
                               f"with lora={{name: adapter_dir}}")
        try:
            return self.lora.resolve(lora_request)
        except LoRAError as e:
            raise RequestError(str(e)) from None

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    lora_request=None) -> str:
        """Queue a request: a prompt (text or token ids) with its params and adapter, or an
        EngineRequest that `check_request` returned. Returns its request id."""
        if isinstance(prompt, EngineRequest):
            if params is not None or lora_request is not None:
                raise RequestError("an EngineRequest already holds its SamplingParams and adapter; pass "
                                   "params=None and lora_request=None")
            req = prompt
        else:
            req = self.check_request(prompt, params, lora_request)
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        p = req.params
        seq = Sequence(next(self._seq_ids), request_id, 0, req.prompt_token_ids, p,
                       make_generator(p.seed, 0, self.device),
                       req.lora_request.lora_int_id if req.lora_request is not None else 0)
        seq.num_pending_forks = p.n - 1
        state = RequestState(request_id, req)
        state.add_seq(seq, self.detokenizer.incremental(p))
        self.requests[request_id] = state
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            if not seq.is_finished:
                self.postprocessor.finish(seq, "abort")
        return req.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """One engine step; returns the outputs of requests that moved (only the finished
        ones with emit_unfinished=False, which saves offline generation building outputs)."""
        t0 = time.perf_counter()
        if self.speculator is not None:     # drafts (or slots for them) for decoding sequences
            self.speculator.prepare(self.scheduler.decoding())
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return self._nothing_scheduled()
        self._track_kv_peak()
        if self.speculator is not None:
            self.speculator.propose(sched)
        logits = self.runner.execute_model(sched)                        # (sum of num_logits, V)
        touched = self.postprocessor.process(sched, logits, self.requests)
        self._count_step(sched, time.perf_counter() - t0)
        return self._collect(touched.values(), emit_unfinished)

    def _nothing_scheduled(self) -> list[RequestOutput]:
        if self.scheduler.waiting and not self.scheduler.running:   # cannot happen with a valid config
            raise LmstackError(f"no request fits in the KV cache ({self.block_manager.num_free_blocks} free "
                               f"blocks); raise kv_cache_tokens")
        return []

    def _collect(self, touched, emit_unfinished: bool) -> list[RequestOutput]:
        outs = [r.output() for r in touched if emit_unfinished or r.finished]
        for r in touched:
            if r.finished:
                self.requests.pop(r.request_id, None)
                self.counters["finished_requests"] += 1
        return outs

    def _count_step(self, sched, dt: float) -> None:
        c = self.counters
        c["steps"] += 1
        c["step_time_s"] += dt
        c["prompt_tokens"] += sched.num_prompt_tokens
        c["last_step_tokens"], c["last_step_time_s"] = sched.num_tokens, dt

    def _track_kv_peak(self) -> None:
        """KV memory waste at peak: allocated token slots that hold no token (only the tail
        of each sequence's last block, with paging) over all allocated slots."""
        bm = self.block_manager
        used = bm.num_used_blocks                       # cached-free blocks count as free
        if used > self.counters["kv_peak_blocks_used"]:
            tokens = bm.filled_slots(self.scheduler.running)
            self.counters["kv_peak_blocks_used"] = used
            self.counters["kv_waste_at_peak"] = 1.0 - tokens / (used * bm.block_size)

    # -- weights --------------------------------------------------------------------------
    def update_weights(self, weights) -> None:
        """Swap the model's weights in place: `weights` is a state dict (names as in
        `model.state_dict()`, a subset is fine) or a module with the same state-dict names.

        Everything is checked first (weights.py): an unknown name, a wrong shape or a float
        tensor for an integer one raises WeightsError naming the tensor, and nothing changes.
        Then the prefix cache is dropped (its K/V came from the old weights) and requests in
        flight are preempted by recompute: they keep the tokens generated so far, their K/V
        is recomputed under the new weights, and every later token comes from the new model
        (their earlier logprobs, if any, stay those of the old one)."""
        pairs = match_weights(self.model, weights)
        self.scheduler.preempt_all()
        self.block_manager.reset_prefix_cache()
        copy_weights(pairs)
        self.counters["weight_updates"] += 1

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> dict:
        bm, c = self.block_manager, self.counters
        gen = self.postprocessor.num_generated_tokens
        stats = {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "kv_block_size": bm.block_size, "kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks, "kv_blocks_cached_free": len(bm.cached_free),
            "kv_cache_usage": bm.num_used_blocks / bm.num_blocks,
            "prefix_cache_hit_rate": bm.prefix_hit_rate, "prefix_cache_hit_tokens": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions, **c, "generation_tokens": gen,
            "tokens_per_s": (c["prompt_tokens"] + gen) / c["step_time_s"] if c["step_time_s"] else 0.0,
            "generation_tokens_per_s": gen / c["step_time_s"] if c["step_time_s"] else 0.0,
            "last_step_tokens_per_s": c["last_step_tokens"] / c["last_step_time_s"] if c["last_step_time_s"] else 0.0,
        }
        if self.speculator is not None:
            stats.update(self.speculator.stats())
        return stats
