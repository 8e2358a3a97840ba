"""Serving load benchmark: continuous batching vs one request at a time, side by side.

    .venv/bin/python benchmarks/bench_serve.py                      # builds a tiny random model
    .venv/bin/python benchmarks/bench_serve.py --model runs/tiny --clients 32 --duration 20

Two `lmstack serve` processes run the same model on loopback ports: the baseline with
`--max-num-seqs 1` (no continuous batching: the engine runs one request to completion,
the others wait in its queue) and the batched one with `--max-num-seqs 64`. N concurrent
streaming clients send completion requests (fixed length: greedy, `ignore_eos`) for a
bounded time and request count; phases alternate baseline / batched for `--rounds` rounds
so both see the same background load. Reported per mode: p50/p99 time to first token,
p50/p99 inter-token latency (gaps between streamed chunks), generated tokens/s; then the
ratios. Goal: >= 3x throughput at equal or better p99 TTFT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["Once upon a time", "The quick brown fox", "Alice counted one two three", "Bob said hello to the",
           "There was a little cat", "In the morning the world", "A long time ago in a town", "Why is the sky"]


def build_model(path: Path) -> Path:
    """A random tiny-preset model (3M parameters) and a small BPE tokenizer, as a run dir."""
    import torch

    from lmstack.model import ModelConfig, Transformer
    from lmstack.tokenizer import Tokenizer

    text = " ".join(PROMPTS * 50) + " the end of the story, and they lived happily."
    tok = Tokenizer.train([text], vocab_size=512,
                          special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny", vocab_size=tok.n_vocab, context_length=512)).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmstack.cli.main", "serve", str(model), "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start in 180 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if not event.get("choices") or not event["choices"][0]["text"]:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    return {"ttft": (first or time.perf_counter()) - t0, "gaps": gaps, "tokens": tokens}


async def load(url: str, clients: int, duration: float, max_requests: int, max_tokens: int) -> dict:
    """`clients` loops, each sending one request after another until time or count runs out."""
    results: list[dict] = []
    issued = 0
    stop_at = time.perf_counter() + duration

    async def worker(i: int, client: httpx.AsyncClient):
        nonlocal issued
        k = 0
        while time.perf_counter() < stop_at and issued < max_requests:
            issued += 1
            results.append(await one_request(client, url, f"{PROMPTS[(i + k) % len(PROMPTS)]} {i}", max_tokens))
            k += 1

    limits = httpx.Limits(max_connections=clients + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {"results": results, "wall": wall}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def summarize(phases: list[dict]) -> dict:
    results = [r for ph in phases for r in ph["results"]]
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    wall = sum(ph["wall"] for ph in phases)
    return {"requests": len(results), "tokens": tokens, "tok_s": tokens / wall if wall else 0.0,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="run dir or HF dir (default: build a tiny random model)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds per phase")
    ap.add_argument("--max-requests", type=int, default=200, help="requests per phase at most")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=2, help="alternating baseline/batched rounds")
    ap.add_argument("--batch", type=int, default=64, help="--max-num-seqs of the batched server")
    args = ap.parse_args()

    os.environ.setdefault("LMSTACK_NO_PROGRESS", "1")
    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else build_model(Path(tmp.name))
    servers = {"baseline": start_server(model, 1), "batched": start_server(model, args.batch)}
    phases: dict[str, list[dict]] = {"baseline": [], "batched": []}
    try:
        for _, url in servers.values():   # warm up each (first forward allocates)
            asyncio.run(load(url, 2, 1.0, 2, 4))
        for rnd in range(args.rounds):
            for mode in ("baseline", "batched"):
                ph = asyncio.run(load(servers[mode][1], args.clients, args.duration, args.max_requests,
                                      args.max_tokens))
                phases[mode].append(ph)
                print(f"round {rnd} {mode:8s}: {len(ph['results'])} requests in {ph['wall']:.1f} s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            proc.wait(timeout=30)
        tmp.cleanup()

    s = {mode: summarize(ph) for mode, ph in phases.items()}
    print(f"\n{args.clients} concurrent streaming clients, {args.max_tokens} tokens per request, "
          f"{args.rounds} x {args.duration:.0f} s per mode; baseline = --max-num-seqs 1 (one request at a time), "
          f"batched = --max-num-seqs {args.batch} (continuous batching)")
    head = f"{'mode':10s} {'reqs':>5s} {'tokens':>7s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} " \
           f"{'ITL p50':>8s} {'ITL p99':>8s}"
    print(head)
    for mode, r in s.items():
        print(f"{mode:10s} {r['requests']:5d} {r['tokens']:7d} {r['tok_s']:8.1f} {r['ttft_p50']:8.3f}s "
              f"{r['ttft_p99']:8.3f}s {1000 * r['itl_p50']:6.1f}ms {1000 * r['itl_p99']:6.1f}ms")
    b, c = s["baseline"], s["batched"]
    thr = c["tok_s"] / b["tok_s"] if b["tok_s"] else float("nan")
    ttft = b["ttft_p99"] / c["ttft_p99"] if c["ttft_p99"] else float("nan")
    print(f"ratio batched/baseline: throughput {thr:.2f}x, p99 TTFT {ttft:.2f}x better "
          f"(baseline p99 / batched p99), p99 ITL {c['itl_p99'] / b['itl_p99']:.2f}x of baseline")
    goal = thr >= 3.0 and c["ttft_p99"] <= b["ttft_p99"]
    print(f"goal (>= 3x throughput at equal or better p99 TTFT): {'met' if goal else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
