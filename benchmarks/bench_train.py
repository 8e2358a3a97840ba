"""Training throughput: our Trainer's step vs a plain loop over transformers' LlamaForCausalLM.

    python benchmarks/bench_train.py                      # CPU, fp32, side by side, prints the ratio
    python benchmarks/bench_train.py --compile            # ours with torch.compile as well
    python benchmarks/bench_train.py --device cuda --preset gpt2-124m --dtype bfloat16 --batch-size 16 \
        --seq-len 1024 --compile --no-hf                  # GPU MFU of the gpt2-124m preset

Both sides get identical dimensions (a Llama-style model: RMSNorm, SwiGLU, RoPE, GQA, tied
embeddings), the same batches, precision and thread count. Ours is `Trainer.train_step`: the
lr schedule, forward, loss, backward, grad clipping and fused AdamW. The peer is the loop one
would write by hand around HF: model(input_ids, labels) -> backward -> clip -> AdamW. Rounds
alternate between the two so that noise from other processes on the machine hits both alike;
the reported figure is the median over rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmstack.model import ModelConfig  # noqa: E402
from lmstack.train import TrainConfig, Trainer  # noqa: E402
from lmstack.train.metrics import peak_flops  # noqa: E402


class RandomBatches:
    def __init__(self, vocab: int, batch_size: int, seq_len: int, n: int = 8):
        g = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g) for _ in range(n)]
        self.i = 0

    def next_batch(self):
        x = self.data[self.i % len(self.data)]
        self.i += 1
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def ours(mcfg: ModelConfig, args, out: str):
    cfg = TrainConfig(out=out, batch_size=args.batch_size, seq_len=args.seq_len, max_steps=10**6,
                      warmup_steps=0, device=args.device, dtype=args.dtype, compile=args.compile,
                      tensorboard=False, eval_every=0, ckpt_every=0)
    t = Trainer(cfg, mcfg, batches=RandomBatches(mcfg.vocab_size, args.batch_size, args.seq_len))
    t._setup()
    return t, lambda: t.train_step()


def hf_llama(mcfg: ModelConfig, args):
    from transformers import LlamaConfig, LlamaForCausalLM
    hcfg = LlamaConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.n_embd, intermediate_size=mcfg.intermediate_size,
                       num_hidden_layers=mcfg.n_layer, num_attention_heads=mcfg.n_head,
                       num_key_value_heads=mcfg.n_kv_head, max_position_embeddings=mcfg.context_length,
                       rms_norm_eps=mcfg.norm_eps, rope_theta=mcfg.rope_theta, tie_word_embeddings=mcfg.tie_embeddings,
                       attention_dropout=0.0)
    hcfg._attn_implementation = "sdpa"
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    model = LlamaForCausalLM(hcfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    data = RandomBatches(mcfg.vocab_size, args.batch_size, args.seq_len)
    dtype = {"float32": None, "auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]

    def step():
        x, _ = data.next_batch()
        x = x.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return model, step


def timed(step, n: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="a ModelConfig preset instead of the Llama-style default")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--n-kv-head", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model")
    ap.add_argument("--no-hf", action="store_true", help="only measure ours (e.g. for GPU MFU)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per round")
    args = ap.parse_args()

    if args.preset:
        mcfg = ModelConfig.preset(args.preset)
    else:
        mcfg = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                           n_kv_head=args.n_kv_head, context_length=max(256, args.seq_len), pos_emb="rope",
                           norm="rmsnorm", mlp="swiglu", tie_embeddings=True)
    tokens = args.batch_size * args.seq_len
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} batch={args.batch_size}x"
          f"{args.seq_len} model: n_layer={mcfg.n_layer} n_embd={mcfg.n_embd} n_head={mcfg.n_head} "
          f"n_kv_head={mcfg.n_kv_head} vocab={mcfg.vocab_size}")
    with tempfile.TemporaryDirectory() as out:
        trainer, our_step = ours(mcfg, args, out)
        sides = {"lmstack Trainer": our_step}
        if not args.no_hf:
            hf_model, hf_step = hf_llama(mcfg, args)
            n_ours = sum(p.numel() for p in trainer.raw_model.parameters())
            n_hf = sum(p.numel() for p in hf_model.parameters())
            assert n_ours == n_hf, f"parameter counts differ: ours {n_ours}, HF {n_hf}"
            sides["HF LlamaForCausalLM loop"] = hf_step
        for step in sides.values():          # warm-up (and compilation)
            timed(step, 2, args.device)
        rates = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, step in sides.items():
                rates[name].append(args.steps * tokens / timed(step, args.steps, args.device))
        med = {name: statistics.median(r) for name, r in rates.items()}
        fpt = trainer.raw_model.flops_per_token(args.seq_len)
        peak = peak_flops(trainer.device, trainer.dtype)
        print(f"{'':28s} {'tokens/s':>10s} {'MFU':>7s}")
        for name, r in med.items():
            print(f"{name:28s} {r:10.0f} {100 * r * fpt / peak:6.2f}%")
        if len(med) == 2:
            ours_r, hf_r = med.values()
            print(f"ratio ours / HF: {ours_r / hf_r:.2f}x (goal >= 1.3x); per-round ratios: "
                  f"{', '.join(f'{a / b:.2f}' for a, b in zip(*rates.values()))}")
        print(f"MFU uses model.flops_per_token={fpt:.3g} and peak {peak / 1e12:.2f} TFLOP/s "
              f"({'per-device table' if args.device != 'cpu' else 'CPU estimate, see train/metrics.py'})")


if __name__ == "__main__":
    main()
