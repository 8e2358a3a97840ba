"""Multiple-choice scoring throughput: our engine (`lmstack.eval.loglikelihood`) vs
lm-evaluation-harness's HFLM, on the same model and the same task, in one process.

    python benchmarks/bench_eval.py                        # CPU, facts_mc and instructions_mc, 3 shots
    python benchmarks/bench_eval.py --tasks facts_mc --questions 100 --rounds 5
    python benchmarks/bench_eval.py --preset tiny --threads 2

The model is the `tiny` preset (random weights: speed does not depend on training) with a
tokenizer trained on a small tinyworld corpus, exported to a Hugging Face folder that HFLM
loads (transformers, float32). Each task's (context, continuation) pairs are built by the
harness from tinyworld's held-out sets (facts: many one-token answers; instructions:
several-token answers); both sides score exactly those strings, with the same batch size and
thread count. Rounds alternate between the two so that noise from other
processes hits both alike; the figure is the median pairs/s over rounds. The numbers are also
compared (max |difference| of the log-likelihoods) so a fast wrong answer cannot pass.

Where the speed comes from: the choices of a question share its context, and the engine's
prefix cache computes it once; contexts that open alike (few-shot prompts, a shared question
stem) share their common blocks too: each context waits for the first one holding its
longest shared prefix (a token trie of the contexts, in whole KV blocks); one-token answers
of a context are all read from one whole-vocabulary row (as HFLM's logits cache does); each
engine call groups requests of similar length (little padding); and the last block runs only
at the scored positions, apart from its keys and values (Transformer.forward's
prune_last_block, which the engine sets: the queries, attention, output projection and MLP
of that block, and the LM head). HFLM recomputes the context for every multi-token choice.
The table shows both token counts.
The ceiling on facts_mc (one-token answers): HFLM computes each context about once too, so
ours wins by the tokens it does not compute (shared prefixes, its padding, its multi-token
choices) and by what runs at the scored positions only. Profile of facts_mc (one thread, 60
questions, torch.profiler, both sides): the matmuls are ~3/4 of either side's op time and
run at ~95 GFLOP/s, the core's float32 rate (a lone F.linear of these shapes gets the same);
we compute 3748 tokens (3986 with the runner's padding; the contexts' distinct prefixes, a
token trie, hold 3543) against HFLM's 5554 (5839 padded), and our matmul time is ~1.9-2x
below HFLM's. So the ratio sits at the goal's edge (medians 1.91x-2.05x over runs on a
shared machine, load ~3): what this task allows without fewer FLOPs per token; tried and
dropped: padding-free rows through the linears (packing the real tokens into one row: +1-2%,
the pack/unpack copies eat most of the 6% padding), KV blocks of 1 or 2 tokens (3-4% fewer
tokens, more block bookkeeping: no faster), other call-grouping windows (more forwards of
fewer rows: slower).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmstack.data.tinyworld import TinyWorldConfig, generate  # noqa: E402
from lmstack.eval import build_examples, load_task, loglikelihood  # noqa: E402
from lmstack.eval.loglikelihood import as_llm  # noqa: E402
from lmstack.model import ModelConfig, Transformer  # noqa: E402
from lmstack.model.hf import export_hf  # noqa: E402
from lmstack.tokenizer import Tokenizer  # noqa: E402


def build(tmp: Path, args) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    """The HF folder of a random `preset` model + its tokenizer, and each task's pairs."""
    corpus = generate(TinyWorldConfig(seed=0, size_mb=0.3, n_eval=max(args.questions, 20)))
    tok = Tokenizer.train(corpus.docs, vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset, vocab_size=tok.n_vocab)).eval()
    hf = tmp / "hf"
    export_hf(model, hf)
    tok.save(hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "eos_token": "<|endoftext|>"}))
    (tmp / "data" / "eval").mkdir(parents=True)
    for name, probes in corpus.evals.items():
        (tmp / "data" / "eval" / f"{name}.jsonl").write_text("\n".join(json.dumps(p) for p in probes))
    pairs = {}
    for task in args.tasks.split(","):
        spec = load_task(task)
        pairs[task] = [(ex.prompt, spec.target_delimiter + c)
                       for ex in build_examples(spec, tmp / "data", args.questions) if hasattr(ex, "choices")
                       for c in ex.choices]
    return hf, pairs


def hflm_tokens(rules, pairs) -> int:
    """Tokens HFLM's forward passes read: one input per distinct context + continuation[:-1]
    (its logits cache scores one-token continuations of one context together)."""
    inputs = {}
    for c, x in (rules.pair(*p) for p in pairs):
        inputs[tuple(c + x[:-1])] = len(c) + len(x) - 1
    return sum(inputs.values())


def bench(task: str, pairs, llm, rules, lm, args) -> float:
    from lm_eval.api.instance import Instance

    instances = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    rates: dict[str, list[float]] = {"lmstack (engine, prefix cache)": [], "lm-eval HFLM": []}
    ours = theirs = None
    computed = 0
    for _ in range(args.rounds):
        llm.engine.block_manager.reset_prefix_cache()          # every round starts cold
        before = llm.stats()["prompt_tokens"]
        t0 = time.perf_counter()
        ours = loglikelihood(llm, pairs, batch_size=args.batch_size)
        rates["lmstack (engine, prefix cache)"].append(len(pairs) / (time.perf_counter() - t0))
        computed = llm.stats()["prompt_tokens"] - before
        t0 = time.perf_counter()
        theirs = lm.loglikelihood(instances, disable_tqdm=True)
        rates["lm-eval HFLM"].append(len(pairs) / (time.perf_counter() - t0))
    naive = sum(len(c) + len(x) for c, x in (rules.pair(*p) for p in pairs))
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    greedy_same = all(a[1] == b[1] for a, b in zip(ours, theirs))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\ntask={task}: {len(pairs)} (context, choice) pairs")
    print(f"{'':32s} {'pairs/s':>9s} {'tokens computed':>16s}")
    tokens = {"lmstack (engine, prefix cache)": computed, "lm-eval HFLM": hflm_tokens(rules, pairs)}
    for k, v in med.items():
        print(f"{k:32s} {v:9.1f} {tokens[k]:16d}")
    ours_r, hf_r = med.values()
    per_round = [a / b for a, b in zip(*rates.values())]
    print(f"ratio ours / HFLM: {ours_r / hf_r:.2f}x (goal >= 2x); median of per-round ratios (each round runs "
          f"both back to back: robust to load drift) {statistics.median(per_round):.2f}x; per-round: "
          + ", ".join(f"{r:.2f}" for r in per_round))
    print(f"every pair in full: {naive} tokens; max |ours - HFLM| log-likelihood {diff:.2e}; "
          f"is_greedy identical: {greedy_same}")
    return ours_r / hf_r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="facts_mc:fewshot3,instructions_mc:fewshot3",
                    help="comma-separated multiple-choice tasks (NAME[:VARIANT] or YAML)")
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        hf, pairs = build(Path(tmp), args)
        llm, rules = as_llm(str(hf), device="cpu")                 # the engine as `lmstack eval` builds it
        # the same max_length as ours: the engine scores prompts of <= context - 1 tokens
        lm = HFLM(pretrained=str(hf), backend="causal", device="cpu", dtype="float32", batch_size=args.batch_size,
                  max_length=llm.engine.max_model_len - 2)
        print(f"questions={args.questions} preset={args.preset} threads={args.threads} batch={args.batch_size} "
              f"rounds={args.rounds} (median pairs/s)")
        for task, task_pairs in pairs.items():
            bench(task, task_pairs, llm, rules, lm, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
