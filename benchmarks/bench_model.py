"""Our Transformer vs Hugging Face LlamaForCausalLM, same dimensions, same weights, side by side.

    .venv/bin/python benchmarks/bench_model.py                 # CPU, float32, defaults below
    .venv/bin/python benchmarks/bench_model.py --dtype bfloat16 --device cuda

Both models are built from one random HF Llama (ours converted with `from_hf`, so the weights
are identical), the same batch goes through both, and repetitions alternate between the two
(ours, HF, HF, ours, ...) so machine noise hits both alike. Reported per metric: the median
over repetitions of (HF time / our time), > 1 means we are faster.

  train  forward + cross-entropy + backward, tokens/s
  fwd    forward only under inference_mode (latency)
  mem    peak memory of one training step. CPU: peak RSS increase over the RSS after the model
         is built, each model in its own fresh subprocess (ru_maxrss); CUDA: max_memory_allocated
         increase. Lower is better; the ratio is HF / ours.
The loss is computed the same way for both (F.cross_entropy on float32 logits outside the model)
and autocast (when --dtype is not float32) wraps both identically.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def build(args):
    import transformers

    from lmstack.model.hf import from_hf
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.n_embd, intermediate_size=args.intermediate,
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_kv_head,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg)
    ours = from_hf(hf)
    device = torch.device(args.device)
    return ours.to(device).train(), hf.to(device).train(), device


def batch(args, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


def autocast(args, device):
    if args.dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, args.dtype))


def logits_of(model, ids, is_hf):
    return model(ids).logits if is_hf else model(ids)


def train_step(model, ids, tgt, is_hf, args, device):
    with autocast(args, device):
        logits = logits_of(model, ids, is_hf)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def fwd_step(model, ids, is_hf, args, device):
    with torch.inference_mode(), autocast(args, device):
        logits_of(model, ids, is_hf)[:, -1].float().sum().item()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def side_by_side(args):
    ours, hf, device = build(args)
    ids, tgt = batch(args, device)
    with torch.no_grad():  # same weights -> same logits: the comparison is apples to apples
        diff = (ours(ids[:1, :32]) - hf(ids[:1, :32]).logits).abs().max().item()
    results = {}
    for name, step in (("train", lambda m, h: train_step(m, ids, tgt, h, args, device)),
                       ("fwd", lambda m, h: fwd_step(m, ids, h, args, device))):
        for _ in range(args.warmup):
            step(ours, False), step(hf, True)
        t_ours, t_hf = [], []
        for r in range(args.reps):
            order = [(ours, False, t_ours), (hf, True, t_hf)]
            for model, is_hf, acc in (order if r % 2 == 0 else order[::-1]):
                acc.append(timed(lambda: step(model, is_hf), device))
        ratios = [h / o for h, o in zip(t_hf, t_ours)]
        results[name] = dict(ours_s=statistics.median(t_ours), hf_s=statistics.median(t_hf),
                             ratio=statistics.median(ratios))
    results["max_abs_logit_diff"] = diff
    return results


def peak_memory_child(args, which: str) -> float:
    """Runs in a fresh process: MiB of peak memory growth over one training step."""
    ours, hf, device = build(args)
    model, is_hf = (hf, True) if which == "hf" else (ours, False)
    del ours, hf
    ids, tgt = batch(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, ids, tgt, is_hf, args, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import gc
    gc.collect()
    with open("/proc/self/statm") as f:
        base_rss = int(f.read().split()[1]) * resource.getpagesize()
    train_step(model, ids, tgt, is_hf, args, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return (peak - base_rss) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--_memory_child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_child:
        print(json.dumps({"mib": peak_memory_child(args, args._memory_child)}))
        return 0

    res = side_by_side(args)
    if not args.no_memory:
        child = [a for a in (argv if argv is not None else sys.argv[1:])]
        mem = {}
        for which in ("ours", "hf"):
            out = subprocess.run([sys.executable, __file__, *child, "--_memory_child", which],
                                 capture_output=True, text=True, check=True).stdout
            mem[which] = json.loads(out.strip().splitlines()[-1])["mib"]
        res["mem"] = dict(ours_mib=mem["ours"], hf_mib=mem["hf"], ratio=mem["hf"] / max(mem["ours"], 1e-9))
    tokens = args.batch * args.seq
    res["config"] = dict(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
                         intermediate=args.intermediate, vocab=args.vocab, batch=args.batch, seq=args.seq,
                         dtype=args.dtype, device=args.device, threads=torch.get_num_threads(), reps=args.reps)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"config: {res['config']}")
    print(f"same weights, max |logit diff| = {res['max_abs_logit_diff']:.2e}")
    print(f"{'metric':<28}{'lmstack':>14}{'HF Llama':>14}{'ratio HF/ours':>16}")
    tr, fw = res["train"], res["fwd"]
    print(f"{'train tokens/s (fwd+bwd)':<28}{tokens / tr['ours_s']:>14.0f}{tokens / tr['hf_s']:>14.0f}{tr['ratio']:>15.2f}x")
    print(f"{'forward latency (ms)':<28}{fw['ours_s'] * 1e3:>14.1f}{fw['hf_s'] * 1e3:>14.1f}{fw['ratio']:>15.2f}x")
    if "mem" in res:
        m = res["mem"]
        label = "peak RSS growth (MiB)" if args.device == "cpu" else "peak CUDA alloc (MiB)"
        print(f"{label:<28}{m['ours_mib']:>14.1f}{m['hf_mib']:>14.1f}{m['ratio']:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
