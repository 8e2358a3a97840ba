"""llama.cpp as the CPU peer of bench_engine.py: the same weights, the same tokens, greedy.

    gguf = export_f32(lmstack_model, folder)       # our exporter (lmstack.quant.export), type f32
    lc = LlamaCpp(gguf, n_ctx=..., n_seq=..., threads=2)
    tokens = lc.generate([prompt], [n])            # batch 1: one token a decode call
    tokens = lc.generate(prompts, max_tokens)      # batched: every running sequence in one decode call
    lc.close()

Driven through llama-cpp-python's low-level bindings (`llama_decode` on a `llama_batch`), not
its `Llama` class: that class decodes one sequence and, without logits_all, keeps no logits to
read back. Here each decode call carries prompt chunks or one new token of every running
sequence (llama.cpp's batched / parallel examples do the same), logits are requested only
where a token is sampled, and the greedy pick is numpy's argmax over those rows. The KV cache
is float32 (type_k = type_v = 0) as our engine's, or f16 (llama.cpp's default) with kv_type; threads as given, for both batch and decode.
The model is exported with a small byte-level BPE tokenizer (the token list GGUF requires);
prompts are token ids, so the tokenizer never runs.
"""
from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

import numpy as np

TEXT = ("the quick brown fox jumps over the lazy dog. " * 8 + "pack my box with five dozen liquor jugs. " * 8)


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def export_f32(model, folder: Path) -> Path:
    """Our GGUF export (F32) of a lmstack Transformer, with a throwaway tokenizer."""
    from lmstack.quant.export import export_gguf
    from lmstack.tokenizer import Tokenizer
    tok = Tokenizer.train([TEXT], vocab_size=300, pattern="gpt2", show_progress=False)
    return Path(export_gguf(model, tok, folder / "model-f32.gguf", type="f32", overwrite=True).path)


class LlamaCpp:
    def __init__(self, path: Path, n_ctx: int, n_seq: int, threads: int, n_batch: int = 2048,
                 kv_type: str = "f32"):
        import llama_cpp as lc
        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, user_data: None)   # kept alive: C holds it
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
        cp.n_seq_max, cp.kv_unified = n_seq, True
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = {"f32": 0, "f16": 1}[kv_type]    # GGML_TYPE_F32 / F16 (llama.cpp's default)
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, n_seq)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, position, sequence, wants logits); returns the argmax of each wanted row."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        picks = []
        for i, item in enumerate(items):
            if item[3]:
                row = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                picks.append(int(row.argmax()))
        return picks

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        """Greedy continuations: prompts prefilled in chunks of n_batch tokens (logits at each
        prompt's last token), then one decode call a step for all unfinished sequences."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        outs: list[list[int]] = [[] for _ in prompts]
        pending: list[tuple[int, int, int, bool]] = []
        for s, p in enumerate(prompts):
            pending += [(t, i, s, i == len(p) - 1) for i, t in enumerate(p)]
        for i in range(0, len(pending), self.n_batch):
            chunk = pending[i:i + self.n_batch]
            for seq, tok in zip([it[2] for it in chunk if it[3]], self._decode(chunk)):
                outs[seq].append(tok)
        last_seqs = [s for s in range(len(prompts)) if len(outs[s]) < max_tokens[s]]
        while last_seqs:
            items = [(outs[s][-1], len(prompts[s]) + len(outs[s]) - 1, s, True) for s in last_seqs]
            for s, tok in zip(last_seqs, self._decode(items)):
                outs[s].append(tok)
            last_seqs = [s for s in last_seqs if len(outs[s]) < max_tokens[s]]
        return outs

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def bench_vs_llamacpp(path: str, hf_model, args, g, label: str, goal: float) -> list[tuple]:
    """Rows for bench_engine.py's table: batch-1 decode (lmstack, llama.cpp F32, transformers;
    goal: lmstack / llama.cpp) and offline mixed prompts (lmstack vs llama.cpp's batched decode),
    the same weights, the same prompt tokens, greedy."""
    import statistics

    import torch

    from bench_engine import VOCAB, engine_generate, hf_generate, timed
    from lmstack.infer import LLM

    n, (lo_in, hi_in, lo_out, hi_out) = args.llamacpp_prompts, args.llamacpp_lens
    in_lens = torch.randint(lo_in, hi_in + 1, (n,), generator=g).tolist()
    out_lens = torch.randint(lo_out, hi_out + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in in_lens]
    llm = LLM(path, device="cpu", dtype=torch.float32, max_num_seqs=n, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    with tempfile.TemporaryDirectory() as tmp:
        lc = LlamaCpp(export_f32(llm.engine.model, Path(tmp)), n_ctx=sum(in_lens) + sum(out_lens) + 64, n_seq=n,
                      threads=torch.get_num_threads())
        try:
            prompt, N = prompts[0][:32], args.decode_tokens
            sides = {"lmstack": lambda k: engine_generate(llm, [prompt], [k])[0],
                     "llama.cpp": lambda k: lc.generate([prompt], [k])[0],
                     "transformers": lambda k: hf_generate(hf_model, [prompt], k)[0]}
            rates = {name: [] for name in sides}
            for fn in sides.values():
                fn(4)
            for _ in range(args.repeats):      # interleaved: a load spike hits every side
                for name, fn in sides.items():
                    t1, _ = timed(lambda: fn(1))
                    tN, _ = timed(lambda: fn(N))
                    rates[name].append((N - 1) / (tN - t1))
            same = sides["lmstack"](N) == sides["llama.cpp"](N)
            r = {name: statistics.median(v) for name, v in rates.items()}
            ratio = r["lmstack"] / r["llama.cpp"]
            rows = [(f"6. {label}: batch-1 decode vs llama.cpp F32 (tok/s)", r["lmstack"], r["llama.cpp"], ratio,
                     f">= {goal}x", ratio >= goal,
                     f"prompt 32, {N} new tokens, median of {args.repeats}; {1e3 / r['lmstack']:.2f} vs "
                     f"{1e3 / r['llama.cpp']:.2f} ms/token; transformers {r['transformers']:.0f} tok/s, lmstack "
                     f"{r['lmstack'] / r['transformers']:.2f}x it; identical greedy tokens: {same}")]
            engine_generate(llm, [prompts[1][:8]], [4])           # warm-up of the batched shapes
            lc.generate([prompts[1][:8]], [4])
            times_ours, times_lc = [], []
            for _ in range(args.repeats):      # interleaved, medians: one run swings +-30% on a busy machine
                dt, ours = timed(lambda: engine_generate(llm, prompts, out_lens))
                times_ours.append(dt)
                dt, theirs = timed(lambda: lc.generate(prompts, out_lens))
                times_lc.append(dt)
            t_ours, t_lc = statistics.median(times_ours), statistics.median(times_lc)
            agree = sum(a == b for a, b in zip(ours, theirs)) / n
            rows.append((f"7. {label}: offline mixed vs llama.cpp batched (tok/s)", sum(out_lens) / t_ours,
                         sum(out_lens) / t_lc, t_lc / t_ours, ">= 1.5x", t_lc / t_ours >= 1.5,
                         f"{n} prompts, in {lo_in}-{hi_in}, out {lo_out}-{hi_out}, {sum(out_lens)} tokens, median of "
                         f"{args.repeats} interleaved runs; "
                         f"llama.cpp prefills in 2048-token batches, then decodes every running sequence in one "
                         f"call a step; identical greedy outputs {agree:.0%}"))
        finally:
            lc.close()
    return rows
