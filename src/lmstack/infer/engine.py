"""The step loop: requests in, one batched forward per step, tokens out. And `LLM`.

    from lmstack.infer import LLM, SamplingParams
    llm = LLM("runs/tiny")                       # or a HF folder, or a Transformer + tokenizer=
    outs = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text, llm.stats())

`LLMEngine.step()` is the whole engine in one place: (speculative proposals) -> schedule
-> run the model over the scheduled rows -> sample (or verify drafts) -> append tokens,
detokenize, check stop conditions -> free finished sequences' blocks -> outputs of the
requests that moved. `LLM.generate` (offline) loops it until its requests finish;
`AsyncLLM` (async_engine.py) runs the same loop in a background thread.

CPU note: a tiny model's ops are too small to split across threads; on a busy machine two
intra-op threads that wait for each other made a decode step up to ~10x slower than one
thread (`torch.set_num_threads(1)`). The engine leaves that global setting to the caller.
"""
from __future__ import annotations

import itertools
import math
import time
import uuid
from dataclasses import dataclass, field

import torch

from lmstack.infer import loader
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.detokenizer import Detokenizer
from lmstack.infer.outputs import CompletionOutput, Logprob, RequestOutput
from lmstack.infer.paged_cache import PagedKVCache
from lmstack.infer.runner import ModelRunner, RunnerRow
from lmstack.infer.sampler import make_generator, sample
from lmstack.infer.sampling import SamplingParams
from lmstack.infer.scheduler import Scheduler
from lmstack.infer.sequence import Sequence
from lmstack.utils import LmstackError, pick_device, pick_dtype


class RequestError(LmstackError, ValueError):
    """A request the engine cannot serve (bad prompt or parameters); other requests go on."""


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return self.aborted or (len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs))


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LmstackError(f"LLM({name}={value!r}): must be a positive int")


class LLMEngine:
    def __init__(self, model, tokenizer=None, block_size: int = 16, kv_cache_tokens: int | None = None,
                 kv_cache_bytes: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, speculative: dict | None = None,
                 device: str = "auto", dtype=None):
        for name, v in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                        ("max_num_batched_tokens", max_num_batched_tokens)):
            _positive_int(name, v)
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        dt = pick_dtype(dtype) if isinstance(dtype, str) else dtype
        self.model, self.tokenizer, self.eos_token_id = loader.load(model, tokenizer, self.device, dt)
        cfg = loader.model_config(self.model)
        if getattr(cfg, "mask", "causal") != "causal":
            raise LmstackError(f"the engine generates with causal models; this model has mask={cfg.mask!r}")
        self.model_config = cfg
        self.max_model_len = cfg.context_length
        self.vocab_size = cfg.vocab_size
        cache_dtype = next(self.model.parameters()).dtype
        per_token = PagedKVCache.bytes_per_token(cfg.n_layer, cfg.n_kv_head, cfg.head_dim, cache_dtype)
        num_blocks = self._num_blocks(block_size, kv_cache_tokens, kv_cache_bytes, per_token, max_num_seqs)
        self.cache = PagedKVCache(cfg.n_layer, num_blocks, block_size, cfg.n_kv_head, cfg.head_dim,
                                  cache_dtype, self.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(self.model, self.cache, self.device)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.speculator = None
        if speculative:
            from lmstack.infer.speculative import make_speculator
            self.speculator = make_speculator(speculative, self)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.counters = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "step_time_s": 0.0,
                         "last_step_tokens": 0, "last_step_time_s": 0.0, "finished_requests": 0,
                         "kv_peak_blocks_used": 0, "kv_waste_at_peak": 0.0}

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

    def check_request(self, prompt, params) -> tuple[str | None, list[int], SamplingParams]:
        """Validate one request at the door; raises RequestError naming the problem."""
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
        if params.n > self.scheduler.max_num_seqs:
            raise RequestError(f"SamplingParams.n={params.n} exceeds max_num_seqs={self.scheduler.max_num_seqs}")
        return text, ids, params

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    checked: tuple | None = None) -> str:
        text, ids, params = checked if checked is not None else self.check_request(prompt, params)
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        seq = Sequence(next(self._seq_ids), request_id, 0, ids, params, make_generator(params.seed, 0, self.device))
        seq.num_pending_forks = params.n - 1
        self.requests[request_id] = Request(request_id, text, ids, params, [seq])
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
                seq.finish_reason = "abort"
                self._finish_seq(seq)
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -------------------------------------------------------------------------
    def step(self, emit_unfinished: bool = True) -> list[RequestOutput]:
        """One engine step; returns the outputs of requests that moved (only the finished
        ones with emit_unfinished=False, which saves offline generation building outputs)."""
        t0 = time.perf_counter()
        if self.speculator is not None:     # drafts (or slots for them) for decoding sequences
            self.speculator.prepare([s for s in self.scheduler.running if s.num_uncomputed_tokens == 1])
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.scheduler.waiting and not self.scheduler.running:   # cannot happen with a valid config
                raise LmstackError(f"no request fits in the KV cache ({self.block_manager.num_free_blocks} free "
                                   f"blocks); raise kv_cache_tokens")
            return []
        self._track_kv_peak()
        if self.speculator is not None:
            self.speculator.copy_blocks(sched.copies)
            self.speculator.propose(sched.scheduled)
        rows = []
        for s in sched.scheduled:
            seq = s.seq
            if seq.timing.first_scheduled is None:
                seq.timing.first_scheduled = t0
            start = seq.num_computed_tokens
            fed = seq.token_ids[start:start + s.num_new_tokens]
            if seq.spec_token_ids:                 # decoding: [last token, d_1 .. d_k]
                fed = fed + seq.spec_token_ids
            num_logits = 1 + len(seq.spec_token_ids) if s.is_prefill_done else 0
            rows.append(RunnerRow(fed, start, seq.block_table, num_logits))
            if seq.num_output_tokens == 0 or seq.num_uncomputed_tokens > 1:
                self.counters["prompt_tokens"] += s.num_new_tokens
        logits = self.runner.execute(rows, sched.copies)                 # (sum num_logits, V)

        touched: dict[str, Request] = {}
        plain: list[tuple[Sequence, int]] = []                           # (seq, logits row)
        offset = 0
        for s, row in zip(sched.scheduled, rows):
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            # before any finish frees them: newly full blocks join the prefix cache (blocks
            # holding draft tokens are never full of *accepted* tokens, so never registered)
            self.block_manager.register_full_blocks(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
            if row.num_logits == 0:
                continue
            if seq.spec_token_ids:
                self._verify(seq, logits[offset:offset + row.num_logits])
            else:
                plain.append((seq, offset))
                for child in self._fork(seq):
                    plain.append((child, offset))
            offset += row.num_logits
        if plain:
            self._sample([p[0] for p in plain], logits[torch.tensor([p[1] for p in plain])])
        dt = time.perf_counter() - t0
        c = self.counters
        c["steps"] += 1
        c["step_time_s"] += dt
        c["last_step_tokens"], c["last_step_time_s"] = sched.num_tokens, dt
        outs = [self._output(r) for r in touched.values() if emit_unfinished or r.finished]
        for r in touched.values():
            if r.finished:
                self.requests.pop(r.request_id, None)
                c["finished_requests"] += 1
        return outs

    def _track_kv_peak(self) -> None:
        """KV memory waste at peak: allocated token slots that hold no token (only the tail
        of each sequence's last block, with paging) over all allocated slots."""
        bm = self.block_manager
        used = bm.num_used_blocks                       # cached-free blocks count as free
        if used > self.counters["kv_peak_blocks_used"]:
            seen, tokens = set(), 0
            for seq in self.scheduler.running:
                for i, b in enumerate(seq.block_table):
                    if b not in seen:
                        seen.add(b)
                        tokens += min(bm.block_size, len(seq) + len(seq.spec_token_ids) - i * bm.block_size)
            self.counters["kv_peak_blocks_used"] = used
            self.counters["kv_waste_at_peak"] = 1.0 - tokens / (used * bm.block_size)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """n > 1: once the prompt is prefilled, siblings share its blocks (copy-on-write)."""
        if not parent.num_pending_forks:
            return []
        req = self.requests[parent.request_id]
        children = []
        for index in range(1, parent.num_pending_forks + 1):
            gen = make_generator(parent.sampling_params.seed, index, self.device)
            child = parent.fork(next(self._seq_ids), index, gen)
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
            req.seqs.append(child)
            children.append(child)
        parent.num_pending_forks = 0
        return children

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        out = sample(logits, [s.sampling_params for s in seqs], [s.generator for s in seqs],
                     prompt_token_ids=[s.prompt_token_ids for s in seqs],
                     output_token_ids=[s.output_token_ids for s in seqs], eos_token_id=self.eos_token_id)
        token_ids = out.token_ids.tolist()
        lps, ranks = out.logprobs.tolist(), out.ranks.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for b, seq in enumerate(seqs):
            lp = None
            if seq.logprobs is not None:
                k = seq.sampling_params.logprobs
                lp = {token_ids[b]: Logprob(lps[b], ranks[b], self.detokenizer.decode_token(token_ids[b]))}
                for r in range(k):
                    tid = top_ids[b][r]
                    if tid not in lp:
                        lp[tid] = Logprob(top_lps[b][r], r + 1, self.detokenizer.decode_token(tid))
            self._append(seq, token_ids[b], lps[b], lp)

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Speculative step for seq: keep the accepted drafts plus one target token."""
        drafts = seq.spec_token_ids
        seq.spec_token_ids = []
        tokens, num_accepted = self.speculator.verify(seq, drafts, logits)
        # K/V of the fed last token and of the accepted drafts are valid; the rest is overwritten later
        seq.num_computed_tokens -= len(drafts) - num_accepted
        for t in tokens:
            self._append(seq, t, None, None)
            if seq.is_finished:
                break

    def _append(self, seq: Sequence, token: int, logprob: float | None, lp: dict | None) -> None:
        """Add one sampled token, then check (in vLLM's order) the stop conditions."""
        now = time.perf_counter()
        seq.append_token(token)
        seq.timing.first_token = seq.timing.first_token or now
        seq.timing.last_token = now
        self.counters["generation_tokens"] += 1
        if logprob is not None:
            seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            seq.logprobs.append(lp or {})
        p = seq.sampling_params
        n_out = seq.num_output_tokens
        reason = stop_reason = None
        if n_out >= p.min_tokens and not p.ignore_eos and token == self.eos_token_id:
            reason, stop_reason = "stop", None
        elif n_out >= p.min_tokens and token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        else:
            matched = self.detokenizer.append(seq, token)
            if matched is not None:
                reason, stop_reason = "stop", matched
            elif (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq) >= self.max_model_len:
                reason = "length"
        if reason is not None:
            if stop_reason is None or isinstance(stop_reason, int):
                self.detokenizer.flush(seq)
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self._finish_seq(seq)

    def _finish_seq(self, seq: Sequence) -> None:
        seq.timing.finished = time.perf_counter()
        self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    # -- outputs and stats ----------------------------------------------------------------
    def _output(self, req: Request) -> RequestOutput:
        comps = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            comps.append(CompletionOutput(
                index=seq.index, text=self.detokenizer.visible_text(seq), token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason, logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob, stop_reason=seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps, req.finished,
                             req.seqs[0].num_cached_tokens, request_metrics(req.seqs))

    def stats(self) -> dict:
        bm, c = self.block_manager, self.counters
        stats = {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "kv_block_size": bm.block_size, "kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks, "kv_blocks_cached_free": len(bm.cached_free),
            "kv_cache_usage": bm.num_used_blocks / bm.num_blocks,
            "prefix_cache_hit_rate": bm.prefix_hit_rate, "prefix_cache_hit_tokens": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions, **c,
            "tokens_per_s": (c["prompt_tokens"] + c["generation_tokens"]) / c["step_time_s"] if c["step_time_s"] else 0.0,
            "generation_tokens_per_s": c["generation_tokens"] / c["step_time_s"] if c["step_time_s"] else 0.0,
            "last_step_tokens_per_s": c["last_step_tokens"] / c["last_step_time_s"] if c["last_step_time_s"] else 0.0,
        }
        if self.speculator is not None:
            stats.update(self.speculator.stats())
        return stats


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
