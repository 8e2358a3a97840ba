"""Parallel training modes on CPU processes (gloo): what each rank holds, what it sends, how long
a step takes, and the pipeline's bubble, for one model.

    python benchmarks/bench_parallel.py                      # 2 and 4 processes, every mode
    python benchmarks/bench_parallel.py --procs 2 --steps 3

Per mode and world size W, the largest rank's:
  params / grads / optim   MiB held, summed over the tensors themselves (a DTensor's local
                           shard, ZeroRedundancyOptimizer's own partition), against the ZeRO
                           paper's formulas with Psi parameters in fp32 (4 Psi, 4 Psi, 8 Psi,
                           divided as each mode divides them). params: at rest between steps /
                           at the forward->backward boundary (FSDP's gathered blocks).
  comm                     payload bytes per optimizer step by collective, counted by a
                           TorchDispatchMode that sees every c10d and functional collective
                           (DDP's C++ reducer and DTensor's internal redistributions included):
                           all-reduce = the tensor, all-gather = the gathered result,
                           reduce-scatter = the input, send/recv = the message.
  step                     seconds per optimizer step (mean over steps 2..n).
  bubble (pp)              1 - (time in the stage's forward/backward) / (time in the schedule),
                           against (p - 1) / (m + p - 1).
The same global batch (GLOBAL sequences) per step in every mode; pp splits it into M micro-batches.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

GLOBAL, M, SEQ = 16, 8, 64
MODEL = dict(vocab_size=1024, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, context_length=SEQ)
KINDS = {"allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
         "all_reduce_coalesced": "all_reduce", "_allgather_base_": "all_gather", "allgather_": "all_gather",
         "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
         "all_gather_into_tensor_coalesced": "all_gather", "_reduce_scatter_base_": "reduce_scatter",
         "reduce_scatter_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
         "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
         "broadcast_": "broadcast", "broadcast": "broadcast", "send": "send", "recv_": "recv"}


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(v) for v in x)
    return 0


def comm_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CommCounter(TorchDispatchMode):
        """Payload bytes and calls per collective kind. Ops on DTensors are handed back
        (NotImplemented) so that DTensor desugars them first and its collectives come through
        here, as torch's CommDebugMode does."""

        def __init__(self):
            super().__init__()
            self.bytes, self.calls = Counter(), Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            from torch.distributed.tensor import DTensor
            if isinstance(func, torch._ops.HigherOrderOperator):
                return func(*args, **(kwargs or {}))
            if any(t is DTensor for t in types):
                return NotImplemented
            name = func._schema.name.split("::")[-1]
            kind = KINDS.get(name) if func.namespace in ("c10d", "_c10d_functional") else None
            if kind is not None:
                size = max(_bytes(args[0]), _bytes(args[1]) if len(args) > 1 else 0)
                if name.startswith("all_gather_into_tensor"):   # functional: (input, group_size, group)
                    size = _bytes(args[0]) * args[1]
                self.bytes[kind] += size
                self.calls[kind] += 1
            return func(*args, **(kwargs or {}))

    return CommCounter()


def local_bytes(t) -> int:
    return _bytes(t.to_local() if hasattr(t, "to_local") else t)


class Batches:
    """Random token windows; data-parallel rank d takes its rows of the global batch."""

    def __init__(self, dp_rank: int, dp_size: int, per_call: int):
        self.g, self.dp_rank, self.dp_size, self.n = torch.Generator().manual_seed(0), dp_rank, dp_size, per_call

    def next_batch(self):
        x = torch.randint(0, MODEL["vocab_size"], (self.n * self.dp_size, SEQ + 1), generator=self.g)
        x = x[self.dp_rank * self.n:(self.dp_rank + 1) * self.n]
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


def measure(mode: str, world: int, steps: int, out: Path, tp_size: int = 0) -> dict | None:
    import torch.distributed as dist

    from lmstack.model import ModelConfig
    from lmstack.train import TrainConfig, Trainer
    rank = dist.get_rank()
    tp = tp_size or (world if mode == "tp" else 1)
    pp = world if mode == "pp" else 1
    dp = world // (tp * pp)
    accum, per_call = (M, GLOBAL // M) if pp > 1 else (1, GLOBAL // dp)
    cfg = TrainConfig(out=str(out / f"{mode}_{world}"), max_steps=steps, batch_size=per_call, grad_accum=accum,
                      seq_len=SEQ, distributed=mode, tp_size=tp_size, eval_every=0, ckpt_every=0,
                      tensorboard=False, warmup_steps=0)
    t = Trainer(cfg, ModelConfig(**MODEL), batches=Batches(rank // tp % dp if pp == 1 else 0, dp, per_call))
    t._setup()
    raw, opt = t.raw_model, t.optimizer
    sharded = mode in ("zero2", "zero3", "fsdp", "tp+dp")
    stats = {"peak": 0, "grads": 0, "busy": 0.0, "pipe": 0.0}

    def held_params() -> int:   # registered now: gathered (plain) tensors while FSDP has a block unsharded
        seen = {id(p): p for p in raw.parameters()}
        now = sum(local_bytes(p) for p in seen.values())
        if sharded:   # + the sharded copies FSDP keeps while a block's gathered tensors are registered
            now += sum(local_bytes(p) for p in rest_params if not any(q is p for q in seen.values()))
        return now

    loss_fn = t.objective.loss

    def loss_then_measure(model, batch):
        out = loss_fn(model, batch)
        stats["peak"] = max(stats["peak"], held_params())
        return out
    t.objective.loss = loss_then_measure
    zero_grad = opt.zero_grad

    def grads_then_zero(*a, **kw):
        stats["grads"] = sum(local_bytes(p.grad) for p in {id(p): p for p in raw.parameters()}.values()
                             if p.grad is not None)
        return zero_grad(*a, **kw)
    opt.zero_grad = grads_then_zero
    if pp > 1:
        stage = t.model.schedule._stage
        for name in ("forward_one_chunk", "backward_one_chunk"):
            real = getattr(stage, name)

            def timed(*a, _real=real, **kw):
                t0 = time.perf_counter()
                try:
                    return _real(*a, **kw)
                finally:
                    stats["busy"] += time.perf_counter() - t0
            setattr(stage, name, timed)
        real_step = t.model.train_step

        def timed_step(batches):
            t0 = time.perf_counter()
            try:
                return real_step(batches)
            finally:
                stats["pipe"] += time.perf_counter() - t0
        t.model.train_step = timed_step
    rest_params = [p for p in {id(p): p for p in raw.parameters()}.values()]
    times = []
    for s in range(steps):
        counter = comm_counter()
        stats["busy"] = stats["pipe"] = 0.0
        dist.barrier()
        t0 = time.perf_counter()
        with counter:
            t.train_step()
        times.append(time.perf_counter() - t0)
    state = opt.optim.state if hasattr(opt, "optim") else opt.state     # ZeroRedundancyOptimizer: its own part
    rec = {"mode": mode, "world": world, "rank": rank, "tp": tp, "pp": pp, "dp": dp, "m": accum,
           "params_rest": sum(local_bytes(p) for p in rest_params),
           "params_peak": stats["peak"] or sum(local_bytes(p) for p in rest_params),   # pp: never gathers
           "grads": stats["grads"],
           "optim": sum(local_bytes(v) for s in state.values() for v in s.values() if torch.is_tensor(v)),
           "comm": dict(counter.bytes), "calls": dict(counter.calls),
           "step_s": sum(times[1:]) / max(1, len(times) - 1),
           "bubble": 1 - stats["busy"] / stats["pipe"] if stats["pipe"] else None}
    recs = [None] * world if rank == 0 else None
    dist.gather_object(rec, recs, dst=0)
    return recs


def worker(out: Path, world: int, steps: int) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    modes = ["ddp", "zero1", "zero2", "zero3", "tp", "pp"] + (["tp+dp"] if world >= 4 else [])
    for mode in modes:
        recs = measure(mode, world, steps, out, tp_size=2 if mode == "tp+dp" else 0)
        if dist.get_rank() == 0:
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(recs) + "\n")
    dist.destroy_process_group()


def formulas(mode: str, r: dict, psi: int, psi_split: int) -> tuple[str, str, str]:
    """(params, grads, optim) MiB by the formulas: Psi fp32 params, AdamW's two moments."""
    W, t, p, dp = r["world"], r["tp"], r["pp"], r["dp"]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    per = {"ddp": (1, 1, 1), "zero1": (1, 1, W), "zero2": (W, W, W), "zero3": (W, W, W), "pp": (p, p, p)}
    if mode in per:
        a, b, c = per[mode]
        return mib(4 * psi / a), mib(4 * psi / b), mib(8 * psi / c)
    local = (psi_split / t + (psi - psi_split)) / dp       # tp: matrices split t ways, norms whole
    return mib(4 * local), mib(4 * local), mib(8 * local)


def report(path: Path) -> None:
    from lmstack.model import ModelConfig, Transformer
    model = Transformer(ModelConfig(**MODEL))
    psi = sum(p.numel() for p in model.parameters())
    psi_split = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    print(f"model: {MODEL}, {psi:,} parameters ({psi_split:,} in matrices); global batch {GLOBAL} x {SEQ} "
          f"tokens per step; pp: {M} micro-batches")
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    head = (f"{'mode':6} {'W':>2} | {'params rest/peak':>17} {'grads':>6} {'optim':>6} | {'formula P/G/O':>18} | "
            f"{'comm MiB/step by collective (calls)':<58} | {'step s':>6} | bubble (formula)")
    print(head + "\n" + "-" * len(head))
    for line in path.read_text().splitlines():
        recs = json.loads(line)
        r = max(recs, key=lambda x: x["params_rest"] + x["grads"] + x["optim"])      # the fullest rank
        comm = " ".join(f"{k} {v / 2**20:.2f} ({r['calls'][k]})" for k, v in sorted(r["comm"].items()))
        bubble = ""
        if r["bubble"] is not None:
            mean = sum(x["bubble"] for x in recs) / len(recs)
            bubble = f"{mean:.3f} ({(r['pp'] - 1) / (r['m'] + r['pp'] - 1):.3f})"
        f = "/".join(formulas(r["mode"], r, psi, psi_split))
        print(f"{r['mode']:6} {r['world']:>2} | {mib(r['params_rest']):>8}/{mib(r['params_peak']):<8} "
              f"{mib(r['grads']):>6} {mib(r['optim']):>6} | {f:>18} | {comm:<58} | "
              f"{max(x['step_s'] for x in recs):6.3f} | {bubble}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), int(args.worker[1]), args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        env = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
        for w in args.procs:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w),
                   __file__, "--steps", str(args.steps), "--worker", str(out), str(w)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{w} processes failed:\n{proc.stderr[-3000:]}")
        report(out / "results.jsonl")


if __name__ == "__main__":
    main()
