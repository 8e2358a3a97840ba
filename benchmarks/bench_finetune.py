"""Finetuning cost side by side: LoRA in lmstack vs PEFT on the same model, and QLoRA vs LoRA vs full.

    python benchmarks/bench_finetune.py                    # CPU, fp32, the default Llama-style model
    python benchmarks/bench_finetune.py --quick            # smaller model, 1 round: a smoke run
    python benchmarks/bench_finetune.py --device cuda --dtype bfloat16 --n-layer 8 --n-embd 1024 --seq-len 512

Sides (one subprocess each, so every peak memory is its own process's):
    peft-lora        transformers' LlamaForCausalLM loaded from our HF export, PEFT LoRA on the same
                     linears (q k v o gate up down), a hand-written loop: forward(labels) ->
                     backward -> clip -> AdamW over the adapters
    lmstack-lora     Transformer.from_pretrained(the same folder) + add_lora, Trainer.train_step
                     with SFTObjective (the loop `lmstack finetune` runs)
    lmstack-qlora    the base quantized to NF4 first (quantize_model), then the same adapters
    lmstack-qlora-ckpt   QLoRA with activation checkpointing (each block recomputed in backward)
    lmstack-full     every weight trained
All get the same batch (B x T tokens, the loss on the second half of each row, as an assistant
turn), the same rank, alpha, precision and thread count.

Where the difference comes from: both sides run the same matmuls in the blocks (PEFT's and our
adapters compute the same low-rank products), but SFTObjective runs the final norm and LM head
only at the trained positions (the model's logits_indices), while the HF loop computes (and
upcasts to float32) logits for every position and masks them with -100 afterwards. With a
32000-word vocabulary the head is as big as the blocks of this model, so that is most of the
gap. With a small vocabulary (--vocab-size 2048) the two do nearly the same FLOPs; what is left
is overhead: our fused qkv and gate|up GEMMs, and LoRALinear adding all of a fused linear's
adapters in one addmm (model/lora.py), make a forward + backward ~7% faster than PEFT's by CPU
time (it was ~6% slower when LoRALinear sliced and concatenated the output per slice).

tokens/s: B*T per step over the timed steps (after one warm-up step), median over rounds; the
rounds interleave the sides so load from other processes hits all alike. tok/CPU-s divides by
the process's CPU time instead: on a shared machine it is the steadier figure (with one
thread, the two agree on an idle one). Peak memory: on CUDA
the allocator's peak (weights included, from 0); on CPU the process's resident high-water mark
(VmHWM, reset after imports) minus its resident size after imports, so weights, gradients,
optimizer state, activations and allocator slack are all counted and the libraries' own code
is not. Saved MiB: what one training forward keeps for backward, the model's own weights
excluded (saved_for_backward_mb): exact, and unaffected by other processes, where the CPU peak
also carries the allocator's slack. Bits per weight: of the block linears (finetune/measure.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SIDES = ("peft-lora", "lmstack-lora", "lmstack-qlora", "lmstack-qlora-ckpt", "lmstack-full")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(vocab: int, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T+1), labels (B, T+1)) with labels -100 on the first half of each row."""
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : (T + 1) // 2] = -100
    return ids, labels


def make_folder(args, root: Path) -> Path:
    """A random Llama-style model exported as a Hugging Face folder: what both sides load."""
    from lmstack.model import ModelConfig, Transformer
    from lmstack.model.hf import export_hf
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                      n_kv_head=args.n_kv_head, intermediate_size=args.intermediate_size,
                      context_length=max(256, args.seq_len + 1), pos_emb="rope", norm="rmsnorm", mlp="swiglu",
                      tie_embeddings=True)
    return export_hf(Transformer(cfg), root / "hf")


# ----------------------------------------------------------------------------- one side, in a child process
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class Peak:
    """Memory from the point of construction (after imports) to the peak."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = 0
        else:
            self.base = _rss_kib("VmRSS") * 1024

    def reset_high_water(self) -> None:        # CPU: forget transient peaks of loading (fp32 before NF4)
        if self.device.type == "cpu":
            # and give freed heap back first: glibc keeps freed blocks (the fp32 weights NF4
            # replaced) resident, which would count as memory the training step then reuses
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")

    def mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def peft_side(args, folder: Path, device: torch.device, peak: Peak):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=ALL_LINEAR)).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ids, labels = (t.to(device) for t in batch(args.vocab_size, args.batch_size, args.seq_len))
    amp = args.dtype == "bfloat16"
    peak.reset_high_water()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids[:, :-1], labels=labels[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params), None, (model, lambda: model(input_ids=ids[:, :-1],
                                                                          labels=labels[:, :-1]).loss)


class FixedBatch:
    """A batch source that returns the same SFTBatch every time."""

    def __init__(self, b):
        self.b = b

    def next_batch(self):
        return self.b

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def lmstack_side(args, folder: Path, device: torch.device, peak: Peak, method: str, ckpt: bool, out: str,
                 compile: bool = False):
    from lmstack.finetune import LoraConfig, add_lora
    from lmstack.finetune.batching import SFTBatch
    from lmstack.finetune.measure import base_bits_per_param
    from lmstack.finetune.sft import SFTObjective
    from lmstack.model import Transformer
    from lmstack.train import TrainConfig, Trainer
    model = Transformer.from_pretrained(folder, dtype=torch.float32)
    if method == "qlora":
        from lmstack.quant import QuantConfig, quantize_model
        quantize_model(model, QuantConfig(method="nf4"))
    if method != "full":
        add_lora(model, LoraConfig(r=args.rank, alpha=2 * args.rank, targets="all-linear"))
    ids, labels = batch(args.vocab_size, args.batch_size, args.seq_len)
    n = int((labels[:, 1:] != -100).sum())
    src = FixedBatch(SFTBatch(ids[:, :-1].contiguous(), labels[:, 1:].contiguous(), None, None, 1.0 / n, ids[:, :-1].numel()))
    cfg = TrainConfig(out=out, batch_size=args.batch_size, seq_len=args.seq_len, max_steps=10**6, warmup_steps=0,
                      lr=1e-3, weight_decay=0.0, device=str(device), dtype=args.dtype, tensorboard=False,
                      eval_every=0, ckpt_every=0, activation_checkpointing=ckpt, compile=compile,
                      save_weights="all" if method == "full" else "trainable")
    trainer = Trainer(cfg, model, SFTObjective(), src)
    trainer._setup()
    peak.reset_high_water()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainer.train_step, trainable, base_bits_per_param(model)["stored"], \
        (model, lambda: trainer._micro_loss(trainer.fwd_model, trainer._prepare(src.b, trainer.gen))[0])


def child(args) -> None:
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  both sides pay for the same imports before the baseline is taken
    import transformers  # noqa: F401
    import lmstack.finetune.sft  # noqa: F401
    device = torch.device(args.device)
    peak = Peak(device)
    with tempfile.TemporaryDirectory() as out:
        if args.child == "peft-lora":
            step, trainable, bits, fwd = peft_side(args, Path(args.folder), device, peak)
        else:
            method = args.child.split("-")[1]
            step, trainable, bits, fwd = lmstack_side(args, Path(args.folder), device, peak, method,
                                                      args.child.endswith("-ckpt"), out)
        step()                                                     # warm-up: optimizer state, caches
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            step()
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        peak_mb = peak.mb()
        saved = saved_for_backward_mb(*fwd)
    tokens = args.steps * args.batch_size * args.seq_len
    print(json.dumps({"tok_s": tokens / dt, "tok_cpu_s": tokens / dc, "peak_mb": peak_mb, "trainable": trainable,
                      "bits": bits, "saved_mb": saved}))


def saved_for_backward_mb(model, forward) -> float:
    """MiB of tensors one training forward keeps for backward, the model's own weights and buffers
    excluded: activations, and anything else a layer saves (a dequantized weight, say). Exact and
    independent of machine load, unlike the peak; with activation checkpointing only what the
    checkpoints keep is seen."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values()) / 2**20


# ----------------------------------------------------------------------------- the parent: rounds, table
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--n-kv-head", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int, default=1408)
    ap.add_argument("--vocab-size", type=int, default=32000, help="Llama's 32000 by default")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--quick", action="store_true", help="n_layer 2, n_embd 256, 1 round of 2 steps")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.n_layer, args.n_embd, args.intermediate_size, args.rounds, args.steps = 2, 256, 704, 1, 2
    if args.child:
        return child(args)
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as root:
        folder = make_folder(args, Path(root))
        print(f"device={args.device} dtype={args.dtype} threads={args.threads} batch={args.batch_size}x{args.seq_len} "
              f"model: n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head}/{args.n_kv_head} "
              f"intermediate={args.intermediate_size} vocab={args.vocab_size}; LoRA r={args.rank} alpha={2 * args.rank} "
              f"on q k v o gate up down")
        runs = {s: [] for s in sides}
        passthrough = [a for a in sys.argv[1:] if a != "--quick"]
        for r in range(args.rounds):
            for s in sides:
                cmd = [sys.executable, __file__, *passthrough, "--child", s, "--folder", str(folder),
                       "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--intermediate-size",
                       str(args.intermediate_size), "--steps", str(args.steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{s} failed:\n{proc.stderr[-3000:]}")
                runs[s].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {s: {k: statistics.median(x[k] for x in rs) for k in ("tok_s", "tok_cpu_s", "peak_mb")}
           | {"trainable": rs[0]["trainable"], "bits": rs[0]["bits"], "saved_mb": rs[0]["saved_mb"]}
           for s, rs in runs.items()}
    print(f"{'':20s} {'tokens/s':>9s} {'tok/CPU-s':>9s} {'peak MiB':>9s} {'saved MiB':>9s} {'trainable':>10s} "
          f"{'base bits/w':>11s}")
    for s, m in med.items():
        bits = "" if m["bits"] is None else f"{m['bits']:.2f}"
        print(f"{s:20s} {m['tok_s']:9.0f} {m['tok_cpu_s']:9.0f} {m['peak_mb']:9.1f} {m['saved_mb']:9.1f} "
              f"{m['trainable']:10,d} {bits:>11s}")
    if "peft-lora" in med and "lmstack-lora" in med:
        a, b = med["lmstack-lora"], med["peft-lora"]
        per_round = ", ".join(f"{x['tok_s'] / y['tok_s']:.2f}" for x, y in zip(runs["lmstack-lora"], runs["peft-lora"]))
        print(f"lmstack LoRA / PEFT LoRA: tokens/s {a['tok_s'] / b['tok_s']:.2f}x (goal >= 1.2x), per CPU-second "
              f"{a['tok_cpu_s'] / b['tok_cpu_s']:.2f}x, peak memory {a['peak_mb'] / b['peak_mb']:.2f}x (goal <= 1.0x); "
              f"per-round tokens/s ratios {per_round}")
    for s in ("lmstack-qlora", "lmstack-qlora-ckpt", "lmstack-full"):
        if s in med and "lmstack-lora" in med:
            print(f"{s} / lmstack-lora: tokens/s {med[s]['tok_s'] / med['lmstack-lora']['tok_s']:.2f}x, "
                  f"peak memory {med[s]['peak_mb'] / med['lmstack-lora']['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
