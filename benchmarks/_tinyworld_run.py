"""The small trained run that bench_rag.py and bench_reasoning.py measure, built once and cached.

    from _tinyworld_run import ensure_run
    run_dir, corpus = ensure_run()          # runs/bench-tinyworld (reused when it exists)
    run_dir, corpus = ensure_run(quick=True)   # a 20-step smoke-test model

It is the default `lmstack run` recipe (tinyworld, 2 MB, the `tiny` preset, 750 steps: about
7 minutes on 2 CPU cores) with one addition: calculator-call documents
('Q: what is 47+38? use the calculator.\\nA: <calc>47+38</calc>=85'), about 6% of the bytes,
so the same model can be asked directly, with worked steps, or with the tool.

The benchmarks run torch on one thread by default: on a shared 2-core machine two torch
threads spin-wait for each other, and we measured a tiny model's forward 25x slower with
two threads than with one under load. Their problems
are drawn with tinyworld's own rule for what is held out, so no evaluation problem (and no
step of one) is ever seen in training, in any of the three forms. The knowledge base
(entities never in training) is tinyworld's, from the same seed.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmstack.data import tinyworld_tasks as tasks  # noqa: E402
from lmstack.data.tinyworld import TinyWorldConfig, TinyWorldCorpus, generate  # noqa: E402
from lmstack.data.tinyworld_world import held_out  # noqa: E402
from lmstack.reasoning.arithmetic import Problem  # noqa: E402

TOOL_SHARE = 0.06


def _train_keep(seed: int):
    """tinyworld's training filter (generate() in data/tinyworld.py): not held out, where
    single-digit arithmetic is never held out."""
    def keep(key: tuple) -> bool:
        if key[0] == "arith" and max(key[2:]) < 10:
            return True
        return not held_out(seed, *key)
    return keep


def tool_traces(seed: int, n_bytes: int) -> list[str]:
    rng, keep, out, size = random.Random(f"bench-tools:{seed}"), _train_keep(seed), [], 0
    while size < n_bytes:
        rec = tasks.arithmetic(rng, keep, steps=False, keep_steps=True)
        out.append(Problem.parse(rec["prompt"]).tool_trace())
        size += len(out[-1]) + 1
    return out


def ensure_run(quick: bool = False, out_dir: str = "runs", seed: int = 0) -> tuple[Path, TinyWorldCorpus]:
    """The run (trained if missing) and its tinyworld corpus. `quick`: a 20-step model on
    0.3 MB, only to smoke-test a benchmark script (its numbers mean nothing)."""
    from lmstack.pipeline import RunOptions, run_pipeline

    name, max_steps, size_mb = ("bench-tinyworld-quick", 20, 0.3) if quick else ("bench-tinyworld", 750, 2.0)
    corpus = generate(TinyWorldConfig(seed=seed, size_mb=size_mb))
    run_dir = ROOT / out_dir / name
    if (run_dir / "model.safetensors").is_file():
        return run_dir, corpus
    docs = corpus.docs + tool_traces(seed, int(TOOL_SHARE * size_mb * 1e6))
    random.Random(seed).shuffle(docs)
    src = ROOT / out_dir / f"{name}-corpus.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run_pipeline(RunOptions(name=name, out_dir=str(ROOT / out_dir), corpus=str(src), size_mb=size_mb * 2,
                            seed=seed, max_steps=max_steps, stages=["corpus", "tokenizer", "shards", "pretrain"]),
                 log=lambda s: print(s, file=sys.stderr))
    return run_dir, corpus


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)
    print(ensure_run(quick="--quick" in sys.argv)[0])
