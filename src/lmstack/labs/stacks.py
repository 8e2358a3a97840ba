"""Lab 15: stacks. One model, three runtimes: lmstack's engine, `transformers`, llama.cpp.

The tiny tinyworld LM (toy.tiny_lm) is run
  - by lmstack's engine (`LLM(model)`: paged KV cache, continuous batching);
  - by transformers, from the Hugging Face folder `lmstack.model.hf.export_hf` writes
    (`AutoModelForCausalLM`, float32, `generate` with its own KV cache);
  - by llama.cpp (llama-cpp-python), from the GGUF file `lmstack.quant.export.export_gguf`
    writes at f32 (the same weights; K/V cache in f32).
Every stack runs on one CPU thread (torch.set_num_threads(1) in the runner, n_threads=1 in
llama.cpp), so the comparison is of the runtimes, not of how many cores each grabs.
  same tokens  greedy continuations of the same prompt ids in each stack (past the end-of-text
               token: all three are told not to stop), compared token by token with ours;
  latency      batch 1: time to the first token (prefill + one step) and time per token of an
               N-token generation (its whole time / N, prefill included), best of interleaved
               repeats (the machine is shared);
  throughput   BATCH prompts of N new tokens: generated tokens / wall time. The engine and
               transformers batch the prompts (transformers left-pads them); llama-cpp-python's
               Llama holds one sequence, so it runs them one after another;
  memory       the weights each runtime holds (parameter bytes; the GGUF file, which llama.cpp
               maps) and the peak resident memory added while loading and running it
               (finetune.measure.PeakMemory: the process's high-water mark, reset at the start;
               the libraries are imported before, so their code is not counted).
At this size a decoding step is a few small matmuls: latency measures each runtime's per-step
overhead far more than its arithmetic, which is the point the numbers make.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from lmstack.finetune.measure import PeakMemory
from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import tiny_lm

STACKS = ("lmstack", "transformers", "llama.cpp")


def _best_times(fns: list, repeats: int) -> list[float]:
    """Best wall time of each function over `repeats` interleaved runs: on a shared machine a run
    is slowed, never sped up, by other jobs (10-20x for a millisecond run, measured), so the
    fastest run is the estimate of the cost."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


class Ours:
    name = "lmstack"

    def __init__(self, model, tok, ctx_len: int, batch: int):
        from lmstack.infer import LLM
        self.llm = LLM(copy.deepcopy(model), tokenizer=tok, device="cpu", dtype=torch.float32, max_num_seqs=batch,
                       kv_cache_tokens=batch * ctx_len + 64, enable_prefix_caching=False)

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        from lmstack.infer import SamplingParams
        outs = self.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.llm.model.parameters())


class HF:
    name = "transformers"

    def __init__(self, model, folder):
        import transformers
        from lmstack.model.hf import export_hf
        export_hf(model, folder)
        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None          # generate past end-of-text, as the others do

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        T = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):                             # left padding, masked
            ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
        return out[:, T:].tolist()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, model, tok, path, ctx_len: int):
        import llama_cpp
        from lmstack.quant.export import export_gguf
        self.file = export_gguf(model, tok, path, type="f32")
        # one thread each (ggml's spinning workers crawl on a shared machine); f32 K/V like the others
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx_len, n_threads=1, n_threads_batch=1, logits_all=True,
                                   verbose=False, type_k=0, type_v=0)

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        outs = []
        for p in prompts:                        # one sequence at a time: the binding holds one
            self.llm.reset()
            self.llm.eval(p)
            toks = []
            for _ in range(n):
                toks.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
                self.llm.eval([toks[-1]])
            outs.append(toks)
        return outs

    def weight_bytes(self) -> int:
        return self.file.nbytes

    def close(self) -> None:
        self.llm.close()


def prompts_from(tokens: np.ndarray, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of `length` ids cut from a held-out token stream at seeded offsets."""
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(tokens) - length, size=n, replace=False)
    return [tokens[s:s + length].tolist() for s in starts]


def run(ctx: LabContext) -> LabResult:
    lm, data = tiny_lm(ctx)
    model, tok = lm.model, data.tokenizer
    n_new, plen, batch, repeats = ctx.pick(16, 64), ctx.pick(16, 32), ctx.pick(4, 16), ctx.pick(3, 7)
    ctx_len = model.config.context_length
    prompts = prompts_from(data.tokens("val"), batch, plen, ctx.seed)
    res: dict[str, dict] = {}
    tokens: dict[str, list[list[int]]] = {}
    import llama_cpp  # noqa: F401  imported before any measurement: a library's code is not the model's memory
    import transformers  # noqa: F401
    for name in STACKS:
        ctx.log(f"  {name}")
        with PeakMemory("cpu") as peak:
            if name == "lmstack":
                stack = Ours(model, tok, ctx_len, batch)
            elif name == "transformers":
                stack = HF(model, ctx.work / "hf")
            else:
                stack = LlamaCpp(model, tok, ctx.work / "tiny-f32.gguf", ctx_len)
            tokens[name] = [stack.greedy([p], n_new)[0] for p in prompts]     # batch 1, also a warm-up
            first, whole, batched_s = _best_times([lambda: stack.greedy(prompts[:1], 1),
                                                     lambda: stack.greedy(prompts[:1], n_new),
                                                     lambda: stack.greedy(prompts, n_new)], repeats)
        res[name] = {"ttft_ms": 1e3 * first, "ms_per_token": 1e3 * whole / n_new,
                     "tokens_per_s": batch * n_new / batched_s, "weights_bytes": stack.weight_bytes(),
                     "peak_rss_added_bytes": peak.bytes}
        if hasattr(stack, "close"):
            stack.close()
        del stack
    for name in STACKS:
        same = [a == b for x, y in zip(tokens["lmstack"], tokens[name]) for a, b in zip(x, y)]
        res[name]["token_agreement"] = float(np.mean(same))
        res[name]["identical_sequences"] = sum(x == y for x, y in zip(tokens["lmstack"], tokens[name]))
    agree = all(res[s]["identical_sequences"] == batch for s in STACKS)
    fastest = min(STACKS, key=lambda s: res[s]["ms_per_token"])
    most = max(STACKS, key=lambda s: res[s]["tokens_per_s"])
    ours = res["lmstack"]
    same = ", ".join(f"{s} {res[s]['identical_sequences']}/{batch}" for s in STACKS)
    lat = ", ".join(f"{s} {res[s]['ms_per_token']:.2f} ms" for s in STACKS)
    thr = ", ".join(f"{s} {res[s]['tokens_per_s']:.0f} tok/s" for s in STACKS)
    insight = Insight(
        "One model gives the same greedy tokens in lmstack, transformers and llama.cpp; the stacks differ only in "
        "what a token costs", agree,
        f"sequences identical to ours: {same} ({n_new} new tokens each); per token at batch 1 {lat} ({fastest} "
        f"fastest); over {batch} prompts {thr} ({most} highest; ours "
        f"{ours['tokens_per_s'] / res['transformers']['tokens_per_s']:.2f}x transformers)")
    numbers = {"params": model.num_params(), "new_tokens": n_new, "prompt_len": plen, "batch": batch,
               "repeats": repeats, "threads": 1, "stacks": res,
               "ratios_vs_lmstack": {s: {k: res[s][k] / ours[k] for k in ("ms_per_token", "ttft_ms", "tokens_per_s")}
                                     for s in STACKS},
               "sample": {"prompt": tok.decode(prompts[0]), **{s: tok.decode(tokens[s][0]) for s in STACKS}},
               "sample_ids": {"prompt": prompts[0], **{s: tokens[s][0] for s in STACKS}}}
    figures = [Figure("stacks", "Per stack: latency per token at batch 1, time to first token, throughput over a "
                      "batch, and memory (weights held and peak resident memory added)", png=_stacks_png(res)),
               Figure("agreement", "Greedy tokens equal to lmstack's, per stack", png=plot.bars_png(
                   {s: res[s]["token_agreement"] for s in STACKS}, "same tokens as lmstack", "share of tokens",
                   annotate="{:.0%}"))]
    built = [f"the tiny tinyworld LM ({model.num_params():,} parameters) run by lmstack's engine, by transformers "
             f"(from export_hf's folder) and by llama.cpp (from export_gguf's f32 file)",
             f"{batch} held-out prompts of {plen} tokens, {n_new} greedy tokens each, one thread per stack"]
    notes = ["llama-cpp-python's Llama holds one sequence, so its throughput is sequential; the engine and "
             "transformers batch the prompts.",
             "Peak resident memory is the process's high-water mark above the start of each stack's run (libraries "
             "imported beforehand): it counts the weights, caches and buffers a runtime allocates, and pages of the "
             "GGUF file llama.cpp maps; 0 means it fit in memory the process already held (freed by earlier work)."]
    return LabResult(built, numbers, figures, insight, notes)


def _stacks_png(res: dict) -> bytes:
    fig, axes = plot.subplots(ncols=4, width=15.0, height=3.6)
    names = list(res)
    colors = plot.COLORS[: len(names)]
    panels = [("ms_per_token", "ms per token (batch 1)", 1), ("ttft_ms", "time to first token (ms)", 1),
              ("tokens_per_s", "throughput (tokens/s)", 1)]
    for ax, (key, title, scale) in zip(axes, panels):
        ax.bar(names, [res[s][key] * scale for s in names], color=colors)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    x = np.arange(len(names))
    axes[3].bar(x - 0.2, [res[s]["weights_bytes"] / 2 ** 20 for s in names], 0.4, color=colors, label="weights")
    axes[3].bar(x + 0.2, [(res[s]["peak_rss_added_bytes"] or 0) / 2 ** 20 for s in names], 0.4, color=colors,
                alpha=0.45, hatch="//", label="peak RSS added")
    axes[3].set_xticks(x, names)
    axes[3].set_title("memory (MiB)")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    return plot.to_png(fig)
