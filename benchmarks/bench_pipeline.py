"""The main job's time per stage, and what it would be on an idle machine.

    python benchmarks/bench_pipeline.py runs/tinyworld          # after `lmstack run` (OMP_NUM_THREADS=1)

On a shared machine wall time measures the other jobs as much as ours. Two numbers separate them:
  * each stage's CPU time (summary.json "cpu_seconds", recorded by the runner): with one torch
    thread, what the stage costs on one idle core;
  * a fixed reference, a single-threaded float32 matmul loop, timed now: its wall / CPU ratio is
    the machine's load factor (1.0 when idle), and stage wall / load factor estimates idle time.
The table prints both estimates; run the pipeline with OMP_NUM_THREADS=1 for the CPU time to mean
one core (two torch threads on two idle cores are faster still, so these are upper bounds).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def reference(rounds: int = 5, n: int = 384, reps: int = 60) -> tuple[float, float]:
    """(best wall seconds, its CPU seconds) of `reps` n x n float32 matmuls on one thread."""
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = (float("inf"), 0.0)
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def main(run_dir: str) -> None:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    wall, cpu = reference()
    load = max(1.0, wall / max(cpu, 1e-9))
    print(f"reference matmul loop: wall {wall:.3f}s, cpu {cpu:.3f}s -> load factor {load:.2f}")
    print(f"{'stage':<10} {'status':<13} {'wall s':>8} {'cpu s':>8} {'wall/load':>10}")
    tot = [0.0, 0.0]
    for s in summary["stages"]:
        c = s.get("cpu_seconds", 0.0)
        print(f"{s['name']:<10} {s['status']:<13} {s['seconds']:>8.1f} {c:>8.1f} {s['seconds'] / load:>10.1f}")
        tot[0] += s["seconds"]
        tot[1] += c
    print(f"{'total':<10} {'':<13} {tot[0]:>8.1f} {tot[1]:>8.1f} {tot[0] / load:>10.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tinyworld")
