"""Held-out measurements of an aligned model, the same before and after training.

    preference_accuracy(model, pairs)                 # {"logp_acc", "margin_logp"}: chosen more likely?
    exact_match(engine, records, prompt_ids)          # greedy answers through the engine
    rm_score_and_kl(engine, rm, ref, prompts, ...)    # PPO: reward-model score and KL to the reference
    samples(engine, prompt_ids, texts)                # greedy completions to show before/after

Generation goes through the rollout engine (`RolloutEngine.sample`, which first copies the
model's current weights into it), so what is measured is what the policy samples.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from lmstack.align.data import collate_pairs
from lmstack.align.dpo import sequence_logps
from lmstack.align.rewards import exact_answer, first_line
from lmstack.align.rollout import response_logps, rollout_tensors
from lmstack.utils import autocast


@torch.no_grad()
def preference_accuracy(model, pairs, batch_size: int = 32, dtype=torch.float32) -> dict:
    """Share of pairs whose chosen response has the higher summed log-prob under `model`,
    and the mean log-prob margin chosen - rejected (the SFT model has these too)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    pc, pr = [], []
    try:
        for s in range(0, len(pairs), batch_size):
            idx = list(range(s, min(s + batch_size, len(pairs))))
            b = collate_pairs([pairs[i] for i in idx], idx).to(device)
            with autocast(device, dtype):
                lp = sequence_logps(model, b).float().cpu()
            pc.append(lp[:len(idx)])
            pr.append(lp[len(idx):])
    finally:
        model.train(was)
    c, r = torch.cat(pc), torch.cat(pr)
    return {"logp_acc": float((c > r).float().mean()), "margin_logp": float((c - r).mean()),
            "logp_chosen": float(c.mean())}


def exact_match(engine, records: list[dict], prompt_ids: list[list[int]], samples: int = 0,
                score=exact_answer) -> dict:
    """Greedy completions of every prompt; the share `score` (a reward function: 1.0 = right;
    default: the first line is the record's answer) counts right, its binomial standard error,
    and the share of the 5 most frequent answer lines (a shortcut check). samples > 0: also
    "exact_match_sampled", the mean over that many samples per prompt at the engine's
    (training) temperature, the distribution RL optimizes."""
    groups = engine.sample(prompt_ids, 1, seed=0, greedy=True)
    hits = [score(r["prompt"], g[0].text, r["answer"]) for r, g in zip(records, groups)]
    lens = [len(g[0].token_ids) for g in groups]
    n = max(1, len(hits))
    em = sum(hits) / n
    answers = Counter(first_line(g[0].text) for g in groups)
    out = {"exact_match": em, "exact_match_se": math.sqrt(em * (1 - em) / n),
           # the 5 most frequent greedy answers' share: RL that gains by answering a few favourite
           # numbers everywhere (a shortcut, not skill) shows here as a rising share
           "top5_answer_share": sum(c for _, c in answers.most_common(5)) / n,
           "completion_len": sum(lens) / max(1, len(lens))}
    if samples:
        groups = engine.sample(prompt_ids, samples, seed=4242)
        hits = [score(r["prompt"], c.text, r["answer"]) for r, g in zip(records, groups) for c in g]
        out["exact_match_sampled"] = sum(hits) / max(1, len(hits))
    return out


@torch.no_grad()
def rm_score_and_kl(engine, reward_model, ref_model, prompt_ids: list[list[int]], seed: int = 12345) -> dict:
    """One sample per prompt at the training temperature: the reward model's mean score, and the
    mean summed log pi - log ref over the sampled tokens (a Monte Carlo KL(pi || ref))."""
    from lmstack.align.reward_model import score_sequences
    rollouts = [g[0] for g in engine.sample(prompt_ids, 1, seed=seed)]
    buf = rollout_tensors(rollouts)
    ref = response_logps(ref_model, buf["input_ids"], buf["mask"], engine.temperature)
    kl = ((buf["old_logps"] - ref) * buf["mask"]).sum(1)
    scores = score_sequences(reward_model, [r.prompt_ids + r.token_ids for r in rollouts])
    return {"rm_score": float(scores.mean()), "kl": float(kl.mean()),
            "completion_len": float(buf["mask"].sum(1).mean())}


def samples(engine, prompt_ids: list[list[int]], prompts: list[str]) -> list[dict]:
    """Greedy completions of the given prompts: [{"prompt", "completion"}]."""
    groups = engine.sample(prompt_ids, 1, seed=0, greedy=True)
    return [{"prompt": p, "completion": g[0].text} for p, g in zip(prompts, groups)]
