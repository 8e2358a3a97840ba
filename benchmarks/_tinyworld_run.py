"""The small trained run that bench_rag.py and bench_reasoning.py measure, built once and cached.

    from _tinyworld_run import ensure_run
    run_dir, corpus = ensure_run()              # runs/bench-rag-reasoning (reused when it exists)
    run_dir, corpus = ensure_run(quick=True)    # a 20-step smoke-test model (numbers mean nothing)

The `tiny` preset (3.7M parameters) pretrained by the pipeline, 1000 steps x 4 x 512 tokens
(whole numbered contexts fit in one sequence),
on tinyworld (2 MB, seed 0) with two additions, both generated here:
  * calculator calls, 'Q: what is 47+38? use the calculator.\\nA: <calc>47+38</calc>=85'
    (0.12 MB), so one model can answer directly, with worked steps, or with the tool;
  * cited reading, 'Context: [1] <entity> [2] <entity> [3] <entity>\\nQ: ...\\nA: ... Tinar [2]'
    (0.6 MB): the numbered-context format of rag/grounded.py, answered with the number of
    the chunk that states the fact, so the model writes its own citations.
Reading and arithmetic get a larger share of the tinyworld mix than the default recipe:
with the default mix and 750 steps the model answered 2% of tinyworld's own reading probes,
too few to measure what retrieval adds.

Nothing evaluated is trained on: arithmetic problems are drawn with tinyworld's held-out
rule (no evaluation problem, nor any step of one, in any form), and the entities of cited
reading are throwaway names, never a name of the world or of the knowledge base.

The benchmarks run torch on one thread by default: on a shared 2-core machine two torch
threads spin-wait for each other, and we measured a tiny model's forward 25x slower with
two threads than with one under load.
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
from lmstack.data.tinyworld_world import (ANIMALS, COLOURS, JOBS, NameMaker, Person, entity_doc,  # noqa: E402
                                          held_out, person_facts, qa)
from lmstack.reasoning.arithmetic import Problem  # noqa: E402

MIX = {"story": 0.2, "biography": 0.15, "facts": 0.1, "arithmetic": 0.15, "arithmetic_steps": 0.15,
       "instruction": 0.15, "reading": 0.1}
TOOL_MB, CITED_MB = 0.12, 0.6


def _train_keep(seed: int):
    """tinyworld's training filter (generate() in data/tinyworld.py): not held out, where
    single-digit arithmetic is never held out."""
    def keep(key: tuple) -> bool:
        if key[0] == "arith" and max(key[2:]) < 10:
            return True
        return not held_out(seed, *key)
    return keep


def _fill(make, n_bytes: int) -> list[str]:
    out, size = [], 0
    while size < n_bytes:
        out.append(make())
        size += len(out[-1].encode()) + 1
    return out


def tool_traces(seed: int, n_bytes: int) -> list[str]:
    rng, keep = random.Random(f"bench-tools:{seed}"), _train_keep(seed)
    return _fill(lambda: Problem.parse(tasks.arithmetic(rng, keep, steps=False, keep_steps=True)["prompt"])
                 .tool_trace(), n_bytes)


def cited_reading(rng: random.Random, forbidden: set[str]) -> str:
    """2-3 throwaway entities (a person with their country, or a country), numbered; a question
    about one of them, answered and cited. Same sentences as the knowledge base's documents."""
    fresh = NameMaker(rng, set(forbidden))
    entities = []
    for _ in range(rng.randint(2, 3)):
        if rng.random() < 0.25:
            c, cap = fresh(), fresh()
            entities.append((f"{c} is a country. the capital of {c} is {cap}.", [("capital", c, cap)]))
        else:
            p = Person(fresh(), fresh(), rng.choice(COLOURS), rng.choice(JOBS), fresh(), rng.choice(ANIMALS))
            entities.append((entity_doc(p, fresh()), person_facts(p)))
    j = rng.randrange(len(entities))
    prompt, answer = qa(*rng.choice(entities[j][1]))
    context = " ".join(f"[{i}] {doc}" for i, (doc, _) in enumerate(entities, start=1))
    return f"Context: {context}\n{prompt} {answer} [{j + 1}]"


def ensure_run(quick: bool = False, out_dir: str = "runs", seed: int = 0) -> tuple[Path, TinyWorldCorpus]:
    """The run (trained if missing) and its tinyworld corpus."""
    from lmstack.pipeline import RunOptions, run_pipeline

    name, max_steps, size_mb = ("bench-rag-reasoning-quick", 20, 0.3) if quick else ("bench-rag-reasoning", 1000, 2.0)
    corpus = generate(TinyWorldConfig(seed=seed, size_mb=size_mb, mix=dict(MIX)))
    run_dir = ROOT / out_dir / name
    if (run_dir / "model.safetensors").is_file():
        return run_dir, corpus
    scale = size_mb / 2.0
    forbidden = corpus.world.names() | {w.strip(".") for d in corpus.kb_docs for w in d["text"].split()
                                        if w[:1].isupper()}
    rng = random.Random(f"bench-cited:{seed}")
    docs = corpus.docs + tool_traces(seed, int(TOOL_MB * scale * 1e6)) + \
        _fill(lambda: cited_reading(rng, forbidden), int(CITED_MB * scale * 1e6))
    random.Random(seed).shuffle(docs)
    src = ROOT / out_dir / f"{name}-corpus.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    run_pipeline(RunOptions(name=name, out_dir=str(ROOT / out_dir), corpus=str(src), size_mb=size_mb * 2,
                            seed=seed, max_steps=max_steps, batch_size=4, seq_len=512,
                            stages=["corpus", "tokenizer", "shards", "pretrain"]),
                 log=lambda s: print(s, file=sys.stderr))
    return run_dir, corpus


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)
    print(ensure_run(quick="--quick" in sys.argv)[0])
