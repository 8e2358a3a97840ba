"""Alignment: effects on held-out tinyworld sets, and step time against TRL, side by side.

    python benchmarks/bench_align.py base       # the starting model (cached in runs/bench-align/base)
    python benchmarks/bench_align.py effect     # DPO, GRPO, reward model + PPO: held-out before -> after
    python benchmarks/bench_align.py speed      # GRPO and DPO step time vs TRL (skipped without trl)
    python benchmarks/bench_align.py all [--quick]
    python benchmarks/bench_align.py effect --only grpo-arith-cot   # GRPO on worked arithmetic

The starting models: "base", a Llama-style transformer (4 layers, width 128, RoPE, RMSNorm,
SwiGLU) with a 512-token BPE, trained 1000 steps as a plain-text LM on tinyworld arithmetic and
instruction records (held-out problems excluded), ~20 minutes on one CPU thread; "arith", the
base trained 1000 more steps on arithmetic alone (13% held-out exact match), the start of PPO
and of grpo-arith; "cot", the base with its context stretched to 128 tokens and trained 800
steps on arithmetic with worked steps (~4 minutes), the start of grpo-arith-cot. rm, dpo and
grpo (on the instruction tasks) start from base. Every method runs through `run_align` exactly
as `lmstack align` does (format plain) and reports the held-out numbers of its summary.json
(`--only grpo-arith` adds the arithmetic GRPO run; `--only grpo-arith-cot` the worked-steps
one, which also answers the held-out problems with the start and the trained model side by
side and reports the paired standard error of the difference, and the change per operation).

Speed: the same model exported to Hugging Face format (export_hf) is what TRL trains; the
same prompts, G, max lengths and batch sizes on both sides; fp32 on the CPU (bf16 on CUDA).
GRPO step = rollouts + scoring + update (TRL generates with transformers' generate, we with
the engine); DPO step = forward/backward over a batch of pairs with precomputed reference
log-probs on both sides. Each side runs `--rounds` timed steps after one untimed warm-up step
(ours, then TRL's); the medians are reported. On a shared machine run it when `uptime` shows
little load: the two sides do not run at the same moment.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmstack.align import data as D  # noqa: E402
from lmstack.align.config import AlignConfig  # noqa: E402
from lmstack.align.runner import run_align  # noqa: E402

OUT = ROOT / "runs" / "bench-align"


# --------------------------------------------------------------------------- the starting model

class PackedDocs:
    """Random windows of seq_len + 1 tokens over the concatenated documents (eot between)."""

    def __init__(self, ids: list[int], batch_size: int, seq_len: int, seed: int = 0):
        self.ids, self.B, self.T = torch.tensor(ids), batch_size, seq_len
        self.g, self.i = torch.Generator().manual_seed(seed), 0

    def next_batch(self):
        starts = torch.randint(0, len(self.ids) - self.T - 1, (self.B,), generator=self.g)
        x = torch.stack([self.ids[s:s + self.T + 1] for s in starts.tolist()])
        self.i += 1
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"i": self.i, "g": self.g.get_state()}

    def load_state_dict(self, sd):
        self.i = sd["i"]
        self.g.set_state(sd["g"])


def base_model(steps: int = 1000, quick: bool = False) -> Path:
    from lmstack.model import ModelConfig
    from lmstack.tokenizer import Tokenizer
    from lmstack.train import TrainConfig, Trainer
    out = OUT / ("base-quick" if quick else "base")
    if (out / "model.safetensors").is_file():
        return out
    recs = D._task_records(0, 400 if quick else 30000, False, ("arithmetic", "arithmetic", "instruction"), "base")
    docs = [r["prompt"] + r["response"] + "\n" for r in recs]
    tok = Tokenizer.train(docs[:5000], vocab_size=512, show_progress=False)
    ids = []
    for d in docs:
        ids += tok.encode_ordinary(d) + [tok.eot_token]
    mcfg = ModelConfig.preset("tiny", vocab_size=tok.n_vocab, n_embd=128, n_layer=4, n_head=4, context_length=64)
    cfg = TrainConfig(out=str(out), max_steps=20 if quick else steps, batch_size=32, seq_len=64, lr=3e-3,
                      warmup_steps=50, eval_every=0, ckpt_every=0, tensorboard=False, device="auto")
    Trainer(cfg, mcfg, batches=PackedDocs(ids, 32, 64)).fit()
    tok.save(out / "tokenizer.json")
    return out


def arithmetic_model(base: Path, steps: int = 1000, quick: bool = False) -> Path:
    """The base trained on for `steps` more steps on tinyworld arithmetic alone (held-out
    problems excluded): the starting model of GRPO and PPO, which need a policy that solves
    some problems (13% held-out exact match, pass@8 33%) for rewards to carry a signal."""
    from lmstack.model import Transformer
    from lmstack.tokenizer import Tokenizer
    from lmstack.train import TrainConfig, Trainer
    out = OUT / ("base2-quick" if quick else "base2")
    if (out / "model.safetensors").is_file():
        return out
    tok = Tokenizer.load(base / "tokenizer.json")
    ids = []
    for r in D._task_records(0, 400 if quick else 40000, False, ("arithmetic",), "base2"):
        ids += tok.encode_ordinary(r["prompt"] + r["response"] + "\n") + [tok.eot_token]
    cfg = TrainConfig(out=str(out), max_steps=20 if quick else steps, batch_size=32, seq_len=64, lr=2e-3,
                      warmup_steps=20, eval_every=0, ckpt_every=0, tensorboard=False, device="auto")
    Trainer(cfg, Transformer.from_pretrained(base, dtype=torch.float32), batches=PackedDocs(ids, 32, 64, seed=1)).fit()
    tok.save(out / "tokenizer.json")
    return out


def cot_model(base: Path, steps: int = 800, quick: bool = False) -> Path:
    """The base with its context stretched 64 -> 128 tokens (RoPE: the same weights) and trained
    `steps` more steps on tinyworld arithmetic with worked steps ('Q: what is 47+38? show your
    work.\nA: 7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 47+38=85'; held-out problems and
    problems whose steps write out a held-out one excluded): the start of grpo-arith-cot, a
    policy whose G samples of one problem differ in correctness more often than direct answers do."""
    import dataclasses

    from lmstack.model import Transformer
    from lmstack.tokenizer import Tokenizer
    from lmstack.train import TrainConfig, Trainer
    out = OUT / ("cot-quick" if quick else "cot")
    if (out / "model.safetensors").is_file():
        return out
    tok = Tokenizer.load(base / "tokenizer.json")
    short = Transformer.from_pretrained(base, dtype=torch.float32)
    model = Transformer(dataclasses.replace(short.config, context_length=128))
    model.load_state_dict(short.state_dict())
    ids = []
    for r in D._task_records(0, 400 if quick else 40000, False, ("arithmetic_steps",), "cot"):
        ids += tok.encode_ordinary(r["prompt"] + r["response"] + "\n") + [tok.eot_token]
    cfg = TrainConfig(out=str(out), max_steps=20 if quick else steps, batch_size=16, seq_len=128, lr=2e-3,
                      warmup_steps=20, eval_every=0, ckpt_every=0 if quick else 200, tensorboard=False,
                      device="auto")
    Trainer(cfg, model, batches=PackedDocs(ids, 16, 128, seed=2)).fit()
    tok.save(out / "tokenizer.json")
    return out


# --------------------------------------------------------------------------- effects

EFFECTS = {    # name -> (starting model: "base" or "arith", settings)
    "rm": ("base", dict(method="rm", tasks=["arithmetic", "instruction"], n_train=3000, n_eval=400, max_steps=300,
                        batch_size=16, lr=3e-4, eval_every=50)),
    # instruction pairs: the tiny model cannot learn arithmetic from "85 over 84" pairs (held-out
    # arithmetic pairs stay at the start's accuracy or fall, and pull the instruction tasks down)
    "dpo": ("base", dict(method="dpo", tasks=["instruction"], n_train=4800, n_eval=400, max_steps=300,
                         batch_size=16, lr=1e-4, beta=0.1, eval_every=50)),
    "grpo": ("base", dict(method="grpo", tasks=["instruction"], n_train=2000, n_eval=300, max_steps=100,
                          group_size=16, prompts_per_rollout=8, batch_size=64, grad_accum=2, lr=1e-4,
                          max_completion_len=8, temperature=1.0, eval_every=50)),
    # arithmetic: 8 prompts a step memorize (held-out exact match fell at every lr); 128 fresh
    # prompts a step at lr 1e-4 raise the sampled held-out exact match (+0.3..0.5 points, 4000
    # problems) but not the greedy one (within +-0.5); recipes/align/grpo.yaml has the numbers
    "grpo-arith": ("arith", dict(method="grpo", n_train=8000, n_eval=4000, max_steps=60, group_size=16,
                                 prompts_per_rollout=128, batch_size=256, grad_accum=8, lr=1e-4,
                                 max_completion_len=8, temperature=0.7, eval_every=20)),
    # worked steps: the cot model writes 'so 47+38=85' after column steps (46% greedy on held-out
    # problems, 19% sampled at T 1.0: groups differ in correctness), the reward reads that number
    "grpo-arith-cot": ("cot", dict(method="grpo", tasks=["arithmetic_steps"], rewards=["final_answer"], n_train=4000,
                                   n_eval=4000, max_steps=100, group_size=8, prompts_per_rollout=32, batch_size=64,
                                   grad_accum=4, lr=1e-4, max_completion_len=96, temperature=1.0, eval_every=50,
                                   eval_samples=0)),
    "ppo": ("arith", dict(method="ppo", n_train=2000, n_eval=200, max_steps=240, prompts_per_rollout=32,
                          batch_size=16, ppo_epochs=2, lr=1e-4, kl_coef=0.05, kl_target=1.0, kl_horizon=64,
                          max_completion_len=8, temperature=1.0, eval_every=60)),
}


def paired_greedy(start: Path, after: Path, records: list[dict], score, max_completion_len: int) -> dict:
    """Greedy exact match of the start and the trained model on the same held-out problems, and
    the standard error of the per-problem difference (paired: both models answer every problem,
    so the SE of after - before is smaller than either binomial SE suggests)."""
    from lmstack.align.rollout import RolloutEngine
    from lmstack.align.runner import load_policy
    hits = []
    for path in (start, after):
        policy, tok, _ = load_policy(str(path))
        engine = RolloutEngine(policy, tok, max_completion_len=max_completion_len, stop_token_ids=[tok.eot_token],
                               stop=["\n"], max_num_seqs=256)
        groups = engine.sample([D.prompt_ids(tok, r["prompt"], "plain") for r in records], 1, seed=0, greedy=True)
        hits.append(torch.tensor([score(r["prompt"], g[0].text, r["answer"]) for r, g in zip(records, groups)]))
    n, d = len(records), hits[1] - hits[0]
    ops = [next(o for o in "+-*" if o in r["prompt"].split("what is ", 1)[1]) for r in records]
    by_op = {o: {"n": ops.count(o), **{k: round(float(h[[x == o for x in ops]].mean()), 3)
                                       for k, h in (("before", hits[0]), ("after", hits[1]))}} for o in "+-*"}
    return {"n": n, "before": round(float(hits[0].mean()), 4), "after": round(float(hits[1].mean()), 4),
            "diff": round(float(d.mean()), 4), "paired_se": round(float(d.std() / n ** 0.5), 4),
            "fixed": int((d > 0).sum()), "broken": int((d < 0).sum()), "by_op": by_op}


def effect(base: Path, which: list[str], quick: bool) -> dict:
    makers = {"base": lambda: base, "arith": lambda: arithmetic_model(base, quick=quick),
              "cot": lambda: cot_model(base, quick=quick)}
    models = {}
    results = {}
    for name in which:
        start, kw = EFFECTS[name]
        if start not in models:
            models[start] = makers[start]()
        kw = dict(kw)
        if quick:
            kw.update(max_steps=4, n_train=64, n_eval=32, eval_every=2)
            kw.update({k: 4 for k in ("prompts_per_rollout",) if k in kw})
            if kw["method"] == "grpo":
                kw.update(group_size=4, batch_size=8, grad_accum=2)
        if name == "ppo":
            kw["reward_model"] = str(OUT / ("rm-quick" if quick else "rm"))
        run_dir = OUT / (f"{name}-quick" if quick else name)   # --quick leaves the measured runs alone
        shutil.rmtree(run_dir, ignore_errors=True)             # a fresh run, not a resume
        t0 = time.perf_counter()
        s = run_align(AlignConfig(model=str(models[start]), out=str(run_dir), format="plain", **kw))
        results[name] = {"model": start, "before": s["before"], "after": s["after"],
                         "seconds": round(time.perf_counter() - t0, 1)}
        if kw["method"] == "grpo" and "arithmetic_steps" in kw.get("tasks", ()):
            from lmstack.align.rewards import final_answer
            held = D.tinyworld_prompts(seed=0, n=kw["n_eval"], heldout=True, tasks=tuple(kw["tasks"]))
            results[name]["paired"] = paired_greedy(models[start], run_dir, held, final_answer,
                                                    kw["max_completion_len"])
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    return results


# --------------------------------------------------------------------------- speed vs TRL

def _hf_export(base: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    from lmstack.model import Transformer
    from lmstack.model.hf import export_hf
    out = OUT / "hf"
    model = Transformer.from_pretrained(base, dtype=torch.float32)
    export_hf(model, out)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return out


class StepTimes:
    """A transformers TrainerCallback that records each optimizer step's wall time."""

    def __init__(self):
        from transformers import TrainerCallback

        times = self.times = []

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                times.append(-time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                times[-1] += time.perf_counter()
        self.callback = _CB()


def _ours_trainer(model, objective, batches, out: Path, batch_size: int, lr: float):
    from lmstack.train import TrainConfig, Trainer
    cfg = TrainConfig(out=str(out), max_steps=10**6, batch_size=batch_size, seq_len=model.config.context_length,
                      lr=lr, warmup_steps=0, eval_every=0, ckpt_every=0, tensorboard=False, device="auto",
                      weight_decay=0.0)
    t = Trainer(cfg, model, objective, batches)
    t._setup()
    return t


def _time_ours(t, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        t.train_step()
        times.append(time.perf_counter() - t0)
    return times


def grpo_speed(base: Path, hf: Path, rounds: int, quick: bool, full_length: bool = False,
               skip_zero_advantage: bool = True) -> dict:
    """full_length: EOS ignored on both sides (ours: ignore_eos; TRL: min_new_tokens = L), so
    every completion is L tokens: the generation-bound regime of long reasoning rollouts.
    skip_zero_advantage=False: ours also runs the update over the rows whose group scored all
    alike (TRL does; their gradient is 0), to show what skipping them is worth. The share of
    such groups in the timed steps is reported (frac_zero_std)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lmstack.align import GRPOObjective, GRPOSource
    from lmstack.align.rewards import exact_answer
    from lmstack.align.runner import load_policy
    P, G, L = (2, 4, 8) if quick else (8, 8, 40 if full_length else 16)   # prompts + 40 fit the 64-token context
    prompts = D.tinyworld_prompts(seed=0, n=P * (rounds + 2) * 2)
    policy, tok, _ = load_policy(str(base))
    src = GRPOSource(policy, tok, prompts, [exact_answer], group_size=G, prompts_per_rollout=P, batch_size=P * G,
                     max_completion_len=L, temperature=1.0, fmt="plain", stop_token_ids=[] if full_length else
                     [tok.eot_token], ignore_eos=full_length, skip_zero_advantage=skip_zero_advantage)
    ours = _ours_trainer(policy, GRPOObjective("grpo", temperature=1.0), src, OUT / "speed-grpo", P * G, 1e-6)
    zero_std = []
    rollout = src._rollout

    def counted(i):                                  # the timed steps' share of groups with no signal
        buf = rollout(i)
        zero_std.append(buf["stats"]["frac_zero_std"])
        return buf
    src._rollout = counted

    def reward(completions, answer, **kw):
        return [exact_answer("", c, a) for c, a in zip(completions, answer)]
    hf_tok = AutoTokenizer.from_pretrained(hf)
    args = GRPOConfig(output_dir=str(OUT / "trl-grpo"), per_device_train_batch_size=P * G, num_generations=G,
                      max_completion_length=L, learning_rate=1e-6, max_steps=rounds + 1, logging_steps=1,
                      report_to=[], use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                      save_strategy="no", temperature=1.0, beta=0.0, loss_type="grpo", disable_dropout=True,
                      shuffle_dataset=False, dataloader_num_workers=0,
                      generation_kwargs={"min_new_tokens": L} if full_length else None)
    cb = StepTimes()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(hf), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"]}
                                                           for p in prompts]),
                          processing_class=hf_tok, callbacks=[cb.callback])
    mine = _time_ours(ours, 1)                       # warm-up (engine built on first use)
    src.engine.generate_s, zero_std[:] = 0.0, []
    mine = _time_ours(ours, rounds)
    gen_share = src.engine.generate_s / sum(mine)
    trainer.train()
    theirs = cb.times[1:]                            # the first step builds caches: left out on both sides
    m, t = statistics.median(mine), statistics.median(theirs)
    return {"prompts": P, "G": G, "max_completion_len": L, "full_length": full_length,
            "skip_zero_advantage": skip_zero_advantage, "frac_zero_std": round(statistics.mean(zero_std), 3),
            "ours_step_s": round(m, 4), "trl_step_s": round(t, 4),
            "ratio_ours_over_trl": round(m / t, 3), "ours_generate_share": round(gen_share, 3)}


def dpo_speed(base: Path, hf: Path, rounds: int, quick: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lmstack.align import DPOObjective, PairBatches, reference_logps, tokenize_pairs
    from lmstack.align.runner import load_policy
    B = 4 if quick else 16
    records = D.tinyworld_pairs(seed=0, n=B * (rounds + 2), tasks=("arithmetic", "instruction"))
    policy, tok, _ = load_policy(str(base))
    pairs = tokenize_pairs(tok, records, "plain", policy.config.context_length)
    ref = reference_logps(policy, pairs)
    ours = _ours_trainer(policy, DPOObjective(0.1), PairBatches(pairs, B, extras=ref), OUT / "speed-dpo", B, 1e-6)
    hf_tok = AutoTokenizer.from_pretrained(hf)
    args = DPOConfig(output_dir=str(OUT / "trl-dpo"), per_device_train_batch_size=B, learning_rate=1e-6,
                     max_steps=rounds + 1, logging_steps=1, report_to=[], use_cpu=not torch.cuda.is_available(),
                     bf16=torch.cuda.is_available(), save_strategy="no", beta=0.1, precompute_ref_log_probs=True,
                     max_length=policy.config.context_length, disable_dropout=True, dataloader_num_workers=0)
    cb = StepTimes()
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(hf), args=args, processing_class=hf_tok,
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                          for r in records]), callbacks=[cb.callback])
    _time_ours(ours, 1)
    mine = _time_ours(ours, rounds)
    trainer.train()
    theirs = cb.times[1:]
    m, t = statistics.median(mine), statistics.median(theirs)
    return {"pairs_per_step": B, "ours_step_s": round(m, 4), "trl_step_s": round(t, 4), "ratio_ours_over_trl":
            round(m / t, 3)}


def speed(base: Path, rounds: int, quick: bool) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed (pip install trl); speed comparison skipped")
        return {}
    hf = _hf_export(base)
    return {"grpo": grpo_speed(base, hf, rounds, quick),
            "grpo_no_skip": grpo_speed(base, hf, rounds, quick, skip_zero_advantage=False),
            "grpo_full_length": grpo_speed(base, hf, rounds, quick, True),
            "dpo": dpo_speed(base, hf, rounds, quick)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["base", "effect", "speed", "all"])
    ap.add_argument("--quick", action="store_true", help="a few steps of everything, to check the script")
    ap.add_argument("--only", default="rm,dpo,grpo,ppo", help=f"effects to measure, of {','.join(EFFECTS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)   # 2 threads ran ~10x slower on a shared 2-core box
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = base_model(quick=args.quick)
    report = {}
    if args.what in ("effect", "all"):
        report["effect"] = effect(base, args.only.split(","), args.quick)
    if args.what in ("speed", "all"):
        report["speed"] = speed(base, args.rounds, args.quick)
    print(json.dumps(report, indent=2))
    path = OUT / f"report{'-quick' if args.quick else ''}.json"        # --only adds to the last report
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for k, v in report.items():
        merged[k] = {**merged.get(k, {}), **v}
    path.write_text(json.dumps(merged, indent=2))


if __name__ == "__main__":
    main()
