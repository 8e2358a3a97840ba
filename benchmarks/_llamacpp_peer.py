"""llama.cpp as the peer of bench_quant.py --peer: greedy decoding through its C API.

llama-cpp-python's high-level `Llama` runs one sequence per context; its C API (the
`llama_cpp.llama_cpp` ctypes bindings) is llama.cpp's own batched interface, used here the way
llama.cpp's `batched` example uses it: one context with n_seq_max sequences, a llama_batch
holding one token per running sequence each step (all prompt tokens at first, n_batch at a
time), logits requested only for each sequence's last token, greedy = argmax of those logits
(NumPy, as our engine takes torch's argmax). The KV cache is llama.cpp's default (f16).
"""
from __future__ import annotations

import ctypes

import numpy as np

_quiet = None   # the no-op log callback (kept alive: llama.cpp holds a pointer to it)


def _silence(L) -> None:
    global _quiet
    if _quiet is None:
        _quiet = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_quiet, ctypes.c_void_p())


class LlamaCpp:
    """One llama.cpp model + context: `generate(prompts, max_tokens)` greedy, batched."""

    def __init__(self, path: str, threads: int, n_seq_max: int, n_ctx: int, n_batch: int = 2048):
        import llama_cpp.llama_cpp as L
        self.L = L
        _silence(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = n_seq_max, threads, threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch, self.n_seq_max = n_batch, n_seq_max
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_batch, 0, n_seq_max)

    def close(self) -> None:
        L = self.L
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = self.model = None

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, position, sequence, wants logits); returns the argmax of each logits row
        asked for, in order."""
        b, L = self.batch, self.L
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (KV cache full? n_ctx too small)")
        picks = []
        for i, it in enumerate(items):
            if it[3]:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                picks.append(int(row.argmax()))
        return picks

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        """Greedy continuations of every prompt (at most n_seq_max), ignoring end-of-text."""
        if len(prompts) > self.n_seq_max:
            raise ValueError(f"{len(prompts)} prompts but the context holds {self.n_seq_max} sequences")
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        outs: list[list[int]] = [[] for _ in prompts]
        # prefill: every prompt token, n_batch at a time; logits at each prompt's last token
        flat = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        last_seq = [s for s, pr in enumerate(prompts)]
        picked: list[int] = []
        for i in range(0, len(flat), self.n_batch):
            picked += self._decode(flat[i:i + self.n_batch])
        for s, tok in zip(last_seq, picked):
            outs[s].append(tok)
        # decode: one token per unfinished sequence per step
        while True:
            live = [s for s in range(len(prompts)) if len(outs[s]) < max_tokens[s]]
            if not live:
                return outs
            items = [(outs[s][-1], len(prompts[s]) + len(outs[s]) - 1, s, True) for s in live]
            for s, tok in zip(live, self._decode(items)):
                outs[s].append(tok)
