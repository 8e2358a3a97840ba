"""Quantized decode speed: float32 vs INT8 / INT4 / NF4 on the same model, side by side.

    .venv/bin/python benchmarks/bench_quant.py            # decode through LLM: 8x512 and 6x768 Llama-shaped
    .venv/bin/python benchmarks/bench_quant.py --quick    # fewer repeats and tokens (a busy machine)
    .venv/bin/python benchmarks/bench_quant.py --fallback # also the PyTorch path (dequantize + F.linear)
    .venv/bin/python benchmarks/bench_quant.py --micro    # one linear: fp32, the PyTorch path, torch's
                                                          # packed kernels, ours; batch 1/4/16; GB/s
    .venv/bin/python benchmarks/bench_quant.py --peer --threads 1   # our INT8 vs llama.cpp Q8_0

Decode: each model (random weights: speed does not depend on them) is quantized with RTN
INT8 per output channel (weight-only, and W8A8: act_bits=8), RTN INT4 in groups of 128 and NF4
(blocks of 64), every linear of
the blocks (the LM head stays float32, as `all-linear` leaves it). Each variant gets its own
`LLM`; repetitions interleave the variants (rotating the order) so machine noise hits all
alike. Batch-1 greedy decode rate = (N - 1) / (t(N tokens) - t(1 token)) from one 8-token
prompt, which removes the prefill; prefix caching is off so both runs prefill alike.
Reported: the median tokens/s, the median over repetitions of (variant / float32), the stored
bits per parameter of the quantized linears (codes + scales + zero points / absmax), the MB of
the whole state dict, and the weight bytes read per token times tokens/s (a lower bound on the
bandwidth achieved: attention, norms and the engine take time too), against this machine's
measured read bandwidth.

--micro: median microseconds of one (M, K) x (K, N) linear: float32 F.linear; the PyTorch path
(dequantize + F.linear, what every step paid before the kernels); torch's own packed-weight CPU
kernels (_weight_int8pack_mm with float32 and bfloat16 activations, _weight_int4pack_mm_for_cpu);
ours (the quantized modules' forward); and the GB/s of weight bytes each of ours reads.

--peer: our INT8 path against llama.cpp (llama-cpp-python) on the same model. Each model's
float32 weights are written by our GGUF export as Q8_0 (every matrix, the LM head and the
embedding included, blocks of 32) and run by llama.cpp; ours quantizes the same weights to
RTN INT8 per output channel, the LM head included (so both read ~8.5 / ~8 bits per weight of
the head too), twice: weight-only (float inputs) and W8A8 (act_bits=8: inputs rounded to int8
in blocks of 128, as llama.cpp rounds activations for its quantized matmuls; integer dot
products). Same thread count on both sides (--threads). Two figures, each side in its
float32 KV cache on both sides (--peer-kv f16: llama.cpp's default f16 KV), greedy, end-of-text ignored:
  batch-1 decode tokens/s: (N - 1) / (t(N tokens) - t(1 token)) from an 8-token prompt;
  offline throughput: 32 mixed prompts (in 16-256, out 16-128 tokens, seeded; --quick: 16-128,
  16-64 and the first model only) sent at once,
  generated tokens / wall time (prefill included): our LLM.generate (max_num_seqs=32) vs
  llama.cpp's batched C API (one context, n_seq_max=32; _llamacpp.py, shared with bench_engine.py).
Repetitions interleave the sides, rotating who goes first; reported: median tokens/s of each
side and the median over repetitions of ours / llama.cpp.  Goals: offline >= 1.0x, batch-1 >=
0.5x. On a shared, busy machine use --threads 1: llama.cpp's threads meet at a spin barrier
after every graph node, and with 2 threads on 2 loaded cores it measured ~1 tok/s at batch 1
(56 with one thread; ours degrades ~2x, pool.h), which would measure the scheduler.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lmstack import kernels
from lmstack.infer import LLM, SamplingParams
from lmstack.model.config import ModelConfig
from lmstack.model.quantized import QuantLinear, make_quant_linear
from lmstack.model.transformer import Transformer
from lmstack.quant import QuantConfig, quantize_model
from lmstack.quant.nf4 import quantize_nf4
from lmstack.quant.rtn import rtn_quantize

MODELS = {  # name -> Llama-shaped config (RoPE, RMSNorm, SwiGLU, GQA), untied LM head
    "8x512 (28M)": dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=4, vocab_size=4096),
    "6x768 (49M)": dict(n_layer=6, n_embd=768, n_head=12, n_kv_head=12, vocab_size=4096),
}
VARIANTS = {"fp32": None, "int8": QuantConfig(method="rtn", bits=8),
            "w8a8": QuantConfig(method="rtn", bits=8, act_bits=8),
            "int4": QuantConfig(method="rtn", bits=4, group_size=128), "nf4": QuantConfig(method="nf4")}


def median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def read_bandwidth() -> tuple[float, float]:
    """GB/s of this machine: (read: sum over 256 MiB; copy: bytes read + written by copy_)."""
    a = torch.ones(64 * 2**20)
    b = torch.empty_like(a)
    t_read = median_time(lambda: a.sum(), 5)
    t_copy = median_time(lambda: b.copy_(a), 5)
    return a.nbytes / t_read / 1e9, 2 * a.nbytes / t_copy / 1e9


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all stored weights, bytes read per decode step: blocks' linears + LM head)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    emb = model.get_submodule("wte").weight if hasattr(model, "wte") else None
    per_step = total - (emb.numel() * emb.element_size() if emb is not None else 0)
    return total, per_step


def quant_bits(model) -> float:
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    n = sum(m.in_features * m.out_features for m in mods)
    return sum(m.bits_per_param() * m.in_features * m.out_features for m in mods) / n if n else 32.0


def build_variants(overrides: dict, fallback: bool) -> dict:
    torch.manual_seed(0)
    base = Transformer(ModelConfig(tie_embeddings=False, context_length=512, **overrides)).eval()
    state = base.state_dict()
    out = {}
    for name, qc in VARIANTS.items():
        model = Transformer(base.config).eval()
        model.load_state_dict(state)
        if qc is not None:
            quantize_model(model, qc)
        llm = LLM(model, kv_cache_tokens=1024, max_num_seqs=1, enable_prefix_caching=False)
        out[name] = (llm, False)
        if fallback and qc is not None and name != "nf4":
            out[name + " (PyTorch path)"] = (llm, True)
    return out


def decode_rate(llm, disabled: bool, prompt: list[int], n: int) -> tuple[float, float]:
    """(seconds for 1 token, seconds for n tokens) of batch-1 greedy generation."""
    def gen(k):
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True))
        return time.perf_counter() - t0
    if disabled:
        with kernels.disabled():
            return gen(1), gen(n)
    return gen(1), gen(n)


def bench_decode(args) -> None:
    read_gbs, copy_gbs = read_bandwidth()
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f}; bandwidth: read {read_gbs:.1f} GB/s, copy (read+write) {copy_gbs:.1f} GB/s; "
          f"kernels: {'built' if kernels.available() else kernels.unavailable_reason()}")
    prompt = list(range(11, 19))
    for mname, overrides in MODELS.items():
        variants = build_variants(overrides, args.fallback)
        for llm, disabled in variants.values():          # warm up every variant once
            decode_rate(llm, disabled, prompt, 4)
        rates = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.reps):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                t1, tn = decode_rate(*variants[k], prompt, args.tokens)
                rates[k].append((args.tokens - 1) / max(tn - t1, 1e-9))
        print(f"\n== {mname}: {args.reps} repetitions x {args.tokens} tokens")
        print(f"{'variant':<22}{'tok/s':>9}{'vs fp32':>9}{'bits/param':>12}{'weights MB':>12}{'GB/s':>8}")
        fp32 = rates["fp32"]
        for k, (llm, _) in variants.items():
            total, per_step = weight_bytes(llm.model)
            ratio = statistics.median(a / b for a, b in zip(rates[k], fp32))
            tps = statistics.median(rates[k])
            print(f"{k:<22}{tps:>9.1f}{ratio:>8.2f}x{quant_bits(llm.model):>12.2f}{total / 1e6:>12.1f}"
                  f"{per_step * tps / 1e9:>8.1f}")
    print("\nbits/param: the quantized linears' stored bits (codes + statistics); weights MB: the whole "
          "state dict (embeddings and the float32 LM head included); GB/s: weight bytes read per token x "
          "tokens/s")


# ---- --micro: one linear layer --------------------------------------------------------------

def micro_case(K: int, N: int, M: int, reps: int) -> tuple[dict, dict]:
    """Median microseconds of each implementation of a (M, K) x (K, N) linear, and the bytes of
    weight (codes + statistics) each reads."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(M, K, generator=g)
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    mods = {name: quantized_linear(lin, qc) for name, qc in VARIANTS.items() if qc is not None}
    i8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)      # torch's int8 kernel: signed codes
    s8 = torch.rand(N, generator=g) * 0.01
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g), 1)
    sz = torch.rand(K // 128, N, 2, generator=g)                              # tinygemm's (scale, zero) per group
    xb = x.bfloat16()
    cases = {
        "fp32": lambda: F.linear(x, w),
        "PyTorch i8": lambda: _disabled(mods["int8"], x),
        "torch i8": lambda: torch._weight_int8pack_mm(x, i8, s8),
        "torch i8 bf16": lambda: torch._weight_int8pack_mm(xb, i8, s8.bfloat16()),
        "torch i4": lambda: torch._weight_int4pack_mm_for_cpu(x, packed4, 128, sz),
    }
    if kernels.available():
        cases.update({f"ours {k}": (lambda m=m: m(x)) for k, m in mods.items()})
    nbytes = {"fp32": 4 * N * K, **{f"ours {k}": m.bits_per_param() * N * K / 8 for k, m in mods.items()}}
    times = {k: [] for k in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()
        for _ in range(reps):                  # interleaved, so load changes hit every column alike
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}, nbytes


def quantized_linear(lin, qc: QuantConfig) -> QuantLinear:
    """One nn.Linear quantized as quantize_model would (RTN or NF4), outside a model."""
    m = make_quant_linear(lin, "linear", qc.method, qc.bits, qc.group_size, qc.symmetric, qc.act_bits)
    if qc.method == "nf4":
        m.set_state(*quantize_nf4(lin.weight, qc.group_size))
    else:
        codes, scale, zero = rtn_quantize(lin.weight, qc.bits, qc.group_size, qc.symmetric)
        m.set_codes(codes, scale, zero)
    return m


def _disabled(m, x):
    with kernels.disabled():
        return m(x)


def bench_micro(args) -> None:
    read_gbs, copy_gbs = read_bandwidth()
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; bandwidth: read "
          f"{read_gbs:.1f} GB/s, copy (read+write) {copy_gbs:.1f} GB/s. Median microseconds over {args.reps}; "
          f"GB/s = weight bytes (codes + statistics) / time")
    head = None
    for K, N in ((768, 2304), (2048, 5632), (5632, 2048)):
        for M in args.rows:
            r, nbytes = micro_case(K, N, M, args.reps)
            if head is None:
                head = list(r)
                gb_cols = [k for k in head if k in nbytes]
                print(f"{'K x N':<11}{'M':>4}" + "".join(f"{k:>14}" for k in head) +
                      f"   GB/s {' / '.join(gb_cols)}")
            print(f"{f'{K}x{N}':<11}{M:>4}" + "".join(f"{r[k]:>14.0f}" for k in head) + "   " +
                  " / ".join(f"{nbytes[k] / r[k] / 1e3:.1f}" for k in gb_cols), flush=True)


# ---- --peer: llama.cpp on the same model --------------------------------------------------

PEER_INT8 = {   # our INT8 paths, the LM head included (llama.cpp's Q8_0 file quantizes it too)
    "ours INT8": QuantConfig(method="rtn", bits=8, targets=("all-linear", "lm_head")),
    "ours W8A8": QuantConfig(method="rtn", bits=8, act_bits=8, targets=("all-linear", "lm_head")),
}


def peer_workload(n: int, quick: bool, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """n prompts of 16-256 tokens (--quick: 16-128), each to be continued by 16-128 (16-64) tokens."""
    g = torch.Generator().manual_seed(seed)
    in_lens = torch.randint(16, 129 if quick else 257, (n,), generator=g).tolist()
    out_lens = torch.randint(16, 65 if quick else 129, (n,), generator=g).tolist()
    return [torch.randint(1, 4000, (k,), generator=g).tolist() for k in in_lens], out_lens


def peer_case(overrides: dict, args, tmp: str):
    from _llamacpp import LlamaCpp   # noqa: E402 (benchmarks/ is on sys.path when run as a script)

    from lmstack.quant.export import export_gguf
    from lmstack.tokenizer import Tokenizer
    torch.manual_seed(0)
    base = Transformer(ModelConfig(tie_embeddings=False, context_length=512, **overrides)).eval()
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog 0123456789. " * 8], vocab_size=300,
                          show_progress=False)
    path = os.path.join(tmp, "model-q8_0.gguf")
    export_gguf(base, tok, path, type="q8_0", overwrite=True)
    prompts, out_lens = peer_workload(args.num_prompts, args.quick)
    n = len(prompts)

    def ours_gen(llm, ps, ms):
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in ms]
        return [o.outputs[0].token_ids for o in llm.generate(ps, params)]

    sides = {}
    for name, qc in PEER_INT8.items():
        model = Transformer(base.config).eval()
        model.load_state_dict(base.state_dict())
        quantize_model(model, qc)
        one = LLM(model, kv_cache_tokens=1024, max_num_seqs=1, enable_prefix_caching=False)
        many = LLM(model, kv_cache_tokens=sum(len(p) + m for p, m in zip(prompts, out_lens)) + 16 * n,
                   max_num_seqs=n, max_num_batched_tokens=2048, enable_prefix_caching=False)
        sides[name] = (lambda ps, ms, llm=one: ours_gen(llm, ps, ms), lambda ps, ms, llm=many: ours_gen(llm, ps, ms))
    theirs1 = LlamaCpp(path, n_ctx=512, n_seq=1, threads=args.threads, kv_type=args.peer_kv)
    theirsN = LlamaCpp(path, n_ctx=n * 512, n_seq=n, threads=args.threads, kv_type=args.peer_kv)
    sides["llama.cpp"] = (theirs1.generate, theirsN.generate)
    prompt = list(range(11, 19))

    def decode(gen) -> float:
        t0 = time.perf_counter()
        gen([prompt], [1])
        t1 = time.perf_counter()
        gen([prompt], [args.tokens])
        return (args.tokens - 1) / max(time.perf_counter() - t1 - (t1 - t0), 1e-9)

    def offline(gen) -> float:
        t0 = time.perf_counter()
        outs = gen(prompts, out_lens)
        dt = time.perf_counter() - t0
        assert [len(o) for o in outs] == out_lens
        return sum(out_lens) / dt

    for one, many in sides.values():                       # warm-up
        one([prompt], [4])
        many(prompts[:2], [4, 4])
    rates = {(k, w): [] for k in sides for w in ("batch-1", "offline")}
    names = list(sides)
    for r in range(args.reps):
        for k in names[r % len(names):] + names[:r % len(names)]:     # rotate who goes first
            rates[k, "batch-1"].append(decode(sides[k][0]))
            rates[k, "offline"].append(offline(sides[k][1]))
    theirs1.close()
    theirsN.close()
    return rates, sum(out_lens), sum(map(len, prompts))


def bench_peer(args) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("--peer needs llama-cpp-python (`make llamacpp`); skipped")
        return
    import tempfile
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(f"our INT8 (RTN per channel, LM head too; weight-only and W8A8) vs llama.cpp {llama_cpp.__version__} "
          f"Q8_0 (our export), "
          f"{args.threads or torch.get_num_threads()} threads each, llama.cpp KV {args.peer_kv}, "
          f"load average {os.getloadavg()[0]:.1f}; "
          f"kernels: {'built' if kernels.available() else kernels.unavailable_reason()}")
    args.threads = args.threads or torch.get_num_threads()
    goals = {"batch-1": 0.5, "offline": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        for mname, overrides in list(MODELS.items())[:1 if args.quick else None]:
            rates, n_out, n_in = peer_case(overrides, args, tmp)
            print(f"\n== {mname}: {args.reps} repetitions; batch-1: {args.tokens} tokens; offline: "
                  f"{args.num_prompts} prompts, {n_in} prompt + {n_out} generated tokens")
            print(f"{'':<10}{'side':<12}{'tok/s':>9}{'vs llama.cpp':>14}{'goal':>7}")
            for w, goal in goals.items():
                theirs = rates["llama.cpp", w]
                print(f"{w:<10}{'llama.cpp':<12}{statistics.median(theirs):>9.1f}")
                for k in PEER_INT8:
                    ours = rates[k, w]
                    ratio = statistics.median(a / b for a, b in zip(ours, theirs))
                    print(f"{'':<10}{k:<12}{statistics.median(ours):>9.1f}{ratio:>13.2f}x{goal:>6.1f}x", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", action="store_true", help="the single-linear kernel table instead of decode")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="--micro: batch rows M")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default: 7 decode, 30 micro)")
    p.add_argument("--tokens", type=int, default=64, help="decode: tokens generated per run")
    p.add_argument("--quick", action="store_true", help="3 repetitions of 32 tokens")
    p.add_argument("--fallback", action="store_true", help="decode: also INT8/INT4 on the PyTorch path")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--peer", action="store_true", help="our INT8 vs llama.cpp Q8_0: batch-1 and offline")
    p.add_argument("--peer-kv", choices=("f32", "f16"), default="f32",
                   help="llama.cpp's KV-cache type for --peer (ours is float32; f16 is llama.cpp's default)")
    p.add_argument("--num-prompts", type=int, default=32, help="--peer: offline prompts")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.tokens = args.reps or 3, 32
    if args.micro:
        args.reps = args.reps or 30
        bench_micro(args)
    elif args.peer:
        args.reps = args.reps or 3
        bench_peer(args)
    else:
        args.reps = args.reps or 7
        bench_decode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
