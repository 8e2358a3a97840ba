"""Lab 12: finetuning, instruction tuning and RLHF, one after another from one pretrained model.

The base is the tiny tinyworld LM (toy.tiny_lm), pretrained on text that contains tinyworld's
instruction records as "Q: reverse the word dog.\\nA: god". The data of every stage comes
from the same source (lmstack.align.data: tinyworld instruction records, train split; the
fixed prompts and held-out sets from the held-out split), so the stages differ only in how
they train:
  plain finetuning     the records as plain text ("Q: ...\\nA: answer\\n"), next-token loss on
                       every token (the pretraining objective on new text), through the Trainer;
  instruction tuning   from the base, the records as chats: the user turn is the instruction
                       ("reverse the word dog."), the assistant turn the answer; loss on the
                       answer and its end-of-turn token only (finetune.sft: SFTBatches,
                       SFTObjective; data.chat_examples builds the masks);
  RLHF (PPO)           from the instruction-tuned model: a reward model (align.reward_model,
                       a copy with a score head, Bradley-Terry on pairs right answer > plausible
                       wrong one), then PPO (align.ppo: policy + value head, GAE, clipped
                       losses, KL penalty to the frozen instruction-tuned reference), rollouts
                       sampled by the engine. Reward and KL are read from the PPO run's metrics.
Each model is then measured the same way: loss on held-out plain text, loss on held-out
answers in the chat format, and greedy answers to FIXED prompts asked as chats through the
engine (exact match, the share that end their turn with the end-of-turn token, the reward
model's score), and what each writes on them. Before and after PPO, also what PPO optimizes:
the reward model's score of answers sampled at temperature 1 to the fixed prompts, and their
KL to the instruction-tuned reference (align.evaluate.rm_score_and_kl); the per-step rollout
scores are noisier (each rollout draws other training prompts).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from lmstack.align.data import PairBatches, tinyworld_pairs, tokenize_pairs
from lmstack.align.evaluate import rm_score_and_kl
from lmstack.align.ppo import PolicyAndValue, PPOObjective, PPOSource, value_model_from
from lmstack.align.reward_model import RewardObjective, pairwise_accuracy, reward_model_from, score_sequences
from lmstack.align.rollout import RolloutEngine
from lmstack.data.chat_examples import ChatExampleOptions, prompt_response_example
from lmstack.data.probes import exact_match
from lmstack.finetune.instruct import question
from lmstack.finetune.sft import SFTBatches, SFTObjective
from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import TaskBatches, tiny_lm, train
from lmstack.tokenizer.chat import END
from lmstack.train import Batch

TASKS = ("instruction",)
MAX_NEW = 12
SFT_SEQ = 64          # packed rows of chats (an instruction chat is 15-40 tokens)
STAGES = ("base", "plain finetuning", "instruction tuning", "RLHF (PPO)")


def stream_windows(tokens: torch.Tensor, seq_len: int):
    """A TaskBatches maker: random windows of a 1-D token stream, next-token targets everywhere."""
    def make(g: torch.Generator, B: int) -> Batch:
        starts = torch.randint(0, len(tokens) - seq_len - 1, (B,), generator=g)
        rows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        return Batch(rows[:, :-1].clone(), rows[:, 1:].clone())
    return make


@torch.no_grad()
def masked_nll(model, seqs: list[tuple[list[int], list[int]]]) -> float:
    """Mean next-token loss over the tokens whose mask is 1 (ids[t] predicted from ids[:t])."""
    model.eval()
    total, count = 0.0, 0
    for ids, mask in seqs:
        x = torch.tensor([ids[:-1]])
        logp = torch.log_softmax(model(x)[0].float(), -1)
        y, m = torch.tensor(ids[1:]), torch.tensor(mask[1:], dtype=torch.bool)
        total += float(-logp[torch.arange(len(y)), y][m].sum())
        count += int(m.sum())
    return total / count


def answer_prompts(model, tok, prompts: list[list[int]], stop: list[int]) -> list[dict]:
    """Greedy completions through the engine, ended by a token of `stop` or MAX_NEW tokens:
    {"ids" (the stop token included), "text"} per prompt."""
    from lmstack.infer import LLM, SamplingParams
    llm = LLM(copy.deepcopy(model).eval(), tokenizer=tok, device="cpu", dtype=torch.float32,
              max_num_seqs=len(prompts), kv_cache_tokens=len(prompts) * model.config.context_length + 64)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop_token_ids=stop))
    return [{"ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outs]


def run(ctx: LabContext) -> LabResult:
    lm, data = tiny_lm(ctx)
    tok, base = data.tokenizer, lm.model
    ctx_len = base.config.context_length
    end_id = tok.special_tokens[END]
    stop = [end_id, tok.eot_token]
    n_train, n_fixed, bs = ctx.pick(400, 3000), ctx.pick(16, 48), ctx.pick(8, 16)
    steps = {"plain": ctx.pick(30, 300), "sft": ctx.pick(40, 400), "rm": ctx.pick(20, 200), "ppo": ctx.pick(8, 96)}

    train_pairs = tinyworld_pairs(ctx.seed, n_train, tasks=TASKS)
    held = tinyworld_pairs(ctx.seed, n_fixed + ctx.pick(32, 160), heldout=True, tasks=TASKS)
    fixed, held = held[:n_fixed], held[n_fixed:]

    def plain(r):
        return f"{r['prompt']}{r['chosen']}\n"

    def chat(r, answer=None):
        return prompt_response_example(tok, question(r["prompt"]), (answer or r["chosen"]).strip(),
                                       ChatExampleOptions(max_len=ctx_len), "tinyworld")
    held_plain = [(ids, [1] * len(ids)) for ids in (tok.encode_ordinary(plain(r)) for r in held)]
    held_chat = [(ex.ids, ex.loss_mask) for ex in (chat(r) for r in held)]
    fixed_ids = [list(tok.render_chat([{"role": "user", "content": question(r["prompt"])}],
                                      add_generation_prompt=True)[0]) for r in fixed]

    models = {"base": base}
    ctx.log("  plain finetuning")
    stream = torch.tensor([t for r in train_pairs for t in tok.encode_ordinary(plain(r))])
    models["plain finetuning"] = train(ctx, "plain", copy.deepcopy(base), steps=steps["plain"], seq_len=64,
                                       batches=TaskBatches(stream_windows(stream, 64), bs, ctx.seed),
                                       batch_size=bs, lr=2e-3).model
    ctx.log("  instruction tuning")
    sft_train = SFTBatches([chat(r) for r in train_pairs], batch_size=bs, seq_len=SFT_SEQ, seed=ctx.seed)
    sft = train(ctx, "sft", copy.deepcopy(base), steps=steps["sft"], batches=sft_train, objective=SFTObjective(),
                batch_size=bs, seq_len=SFT_SEQ, lr=2e-3).model
    models["instruction tuning"] = sft

    ctx.log("  reward model")
    pair_recs = [{"prompt": question(r["prompt"]), "chosen": r["chosen"].strip(), "rejected": r["rejected"].strip()}
                 for r in train_pairs]
    held_recs = [{"prompt": question(r["prompt"]), "chosen": r["chosen"].strip(), "rejected": r["rejected"].strip()}
                 for r in held]
    rm_run = train(ctx, "rm", reward_model_from(sft, ctx.seed), steps=steps["rm"],
                   batches=PairBatches(tokenize_pairs(tok, pair_recs, "chat", ctx_len), bs, ctx.seed),
                   objective=RewardObjective(), batch_size=bs, seq_len=ctx_len, lr=1e-3)
    rm = rm_run.model.requires_grad_(False).eval()
    rm_acc = pairwise_accuracy(rm, tokenize_pairs(tok, held_recs, "chat", ctx_len))

    ctx.log("  PPO")
    ref = copy.deepcopy(sft).requires_grad_(False).eval()
    policy = copy.deepcopy(sft).train()
    pv = PolicyAndValue(policy, value_model_from(rm))
    ppo_prompts = [{"prompt": question(r["prompt"])} for r in train_pairs]
    per_rollout, batch = ctx.pick(16, 32), 8
    source = PPOSource(pv, tok, ppo_prompts, rm, ref, prompts_per_rollout=per_rollout, batch_size=batch,
                       ppo_epochs=2, max_completion_len=MAX_NEW, temperature=1.0, fmt="chat", kl_coef=0.05,
                       stop_token_ids=stop, seed=ctx.seed)
    ppo_run = train(ctx, "ppo", pv, steps=steps["ppo"], batches=source, objective=PPOObjective(), batch_size=batch,
                    seq_len=ctx_len, lr=3e-4)
    models["RLHF (PPO)"] = ppo_run.model.policy.eval()
    rsteps, score = ppo_run.curve("train", "score")
    _, kl = ppo_run.curve("train", "kl")

    answers_of, stages = {}, {}
    for name in STAGES:
        m = models[name]
        ctx.log(f"  measure {name}")
        m.eval()
        answers = answer_prompts(m, tok, fixed_ids, stop)
        answers_of[name] = answers
        scores = score_sequences(rm, [p + a["ids"] for p, a in zip(fixed_ids, answers)])
        stages[name] = {"plain_text_loss": masked_nll(m, held_plain), "chat_answer_loss": masked_nll(m, held_chat),
                        "exact_match": float(np.mean([exact_match(a["text"], r["chosen"])
                                                      for a, r in zip(answers, fixed)])),
                        "stop_rate": float(np.mean([a["ids"][-1:] == [end_id] for a in answers])),
                        "rm_score": float(scores.mean()),
                        "mean_new_tokens": float(np.mean([len(a["ids"]) for a in answers]))}
    for prev, name in zip(STAGES, STAGES[1:]):
        src = "instruction tuning" if name == "RLHF (PPO)" else "base"
        stages[name]["changed_vs_" + src] = float(np.mean([a["ids"] != b["ids"] for a, b in
                                                          zip(answers_of[name], answers_of[src])]))
    k = max(1, len(score) // 3)
    ppo_sum = {"score_first": float(np.mean(score[:k])), "score_last": float(np.mean(score[-k:])),
               "kl_first": float(np.mean(kl[:k])), "kl_last": float(np.mean(kl[-k:]))}
    # what PPO optimizes, before and after on the same prompts: the reward model's score of sampled
    # answers (temperature 1, SAMPLES seeds per fixed prompt) and their KL to the reference
    sampled = {}
    for name in ("instruction tuning", "RLHF (PPO)"):
        eng = RolloutEngine(models[name], tok, max_completion_len=MAX_NEW, temperature=1.0, stop_token_ids=stop,
                            max_num_seqs=len(fixed_ids))
        runs = [rm_score_and_kl(eng, rm, ref, fixed_ids, seed=1000 + i) for i in range(ctx.pick(2, 4))]
        sampled[name] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        stages[name]["sampled_rm_score"], stages[name]["sampled_kl"] = sampled[name]["rm_score"], sampled[name]["kl"]

    b, p, s, r = (stages[n] for n in STAGES)
    holds = (p["plain_text_loss"] < b["plain_text_loss"] and s["chat_answer_loss"] < p["chat_answer_loss"]
             and s["stop_rate"] > p["stop_rate"] and r["sampled_rm_score"] > s["sampled_rm_score"]
             and r["sampled_kl"] > s["sampled_kl"])
    insight = Insight(
        "Plain finetuning lowers the loss on its text but does not teach the model to answer a chat; instruction "
        "tuning does (answers and ends its turn); PPO then raises the reward model's score while drifting from "
        "the instruction-tuned model", holds,
        f"held-out text loss {b['plain_text_loss']:.3f} -> {p['plain_text_loss']:.3f} after plain finetuning "
        f"(chat answer loss {p['chat_answer_loss']:.3f}, turns ended {p['stop_rate']:.0%}); instruction tuning: "
        f"chat answer loss {s['chat_answer_loss']:.3f}, turns ended {s['stop_rate']:.0%}, exact "
        f"{s['exact_match']:.0%} (base {b['exact_match']:.0%}); PPO ({len(score)} steps): reward-model score of "
        f"sampled answers to the fixed prompts {s['sampled_rm_score']:+.3f} -> {r['sampled_rm_score']:+.3f}, KL to "
        f"the instruction-tuned model {s['sampled_kl']:.3f} -> {r['sampled_kl']:.3f} nats, exact answers "
        f"{s['exact_match']:.0%} -> {r['exact_match']:.0%} (the reward model is right on {rm_acc:.0%} of held-out "
        f"pairs; rollout score {ppo_sum['score_first']:+.3f} -> {ppo_sum['score_last']:+.3f}, first to last third)")
    samples = [{"prompt": question(r["prompt"]), "answer": r["chosen"].strip(),
                **{n: answers_of[n][i]["text"] for n in STAGES}} for i, r in enumerate(fixed[:8])]
    numbers = {"steps": steps, "train_records": len(train_pairs), "fixed_prompts": n_fixed, "held_out": len(held),
               "stages": stages, "reward_model_heldout_acc": rm_acc, "ppo": {**ppo_sum, "steps": rsteps,
                                                                             "score": score, "kl": kl},
               "samples": samples}
    figures = [Figure("ppo_reward", "PPO: the reward model's score and the KL to the instruction-tuned model per "
                      "step (each rollout batch serves several steps)", png=_ppo_png(rsteps, score, kl)),
               Figure("stages", "Per stage: loss on held-out text and on held-out chat answers, and on the fixed "
                      "prompts: turns ended, exact answers, reward-model score", png=_stages_png(stages)),
               Figure("samples", "What each stage writes on the same fixed prompts (greedy)",
                      html=_samples_html(samples))]
    built = [f"the tiny tinyworld LM finetuned three ways on {len(train_pairs)} tinyworld instruction records: "
             f"plain text ({steps['plain']} steps), chats with an answer-only loss ({steps['sft']} steps), then a "
             f"reward model ({steps['rm']} steps) and PPO from the instruction-tuned model ({steps['ppo']} steps, "
             f"{per_rollout} prompts per rollout, 2 epochs of batch {batch})",
             f"every stage measured on {len(held)} held-out records and {n_fixed} fixed held-out prompts asked as "
             f"chats through the engine (greedy, up to {MAX_NEW} tokens)"]
    return LabResult(built, numbers, figures, insight)


def _ppo_png(steps, score, kl) -> bytes:
    fig, ax = plot.subplots(width=7.0, height=4.0)
    ax.plot(steps, score, "o", color=plot.COLORS[0], alpha=0.5, markersize=3, label="reward-model score (rollout mean)")
    ax.plot(steps, plot.smooth(score, 0.9), "-", color=plot.COLORS[0], label="score, smoothed")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("score")
    ax2 = ax.twinx()
    ax2.plot(steps, kl, "s--", color=plot.COLORS[1], label="KL to reference (nats/response)")
    ax2.set_ylabel("KL")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    return plot.to_png(fig)


def _stages_png(stages: dict) -> bytes:
    fig, axes = plot.subplots(ncols=3, width=14.0, height=3.8)
    names = list(stages)
    x = np.arange(len(names))
    colors = plot.COLORS[: len(names)]
    axes[0].bar(x - 0.2, [stages[n]["plain_text_loss"] for n in names], 0.4, color=colors, label="plain text")
    axes[0].bar(x + 0.2, [stages[n]["chat_answer_loss"] for n in names], 0.4, color=colors, alpha=0.45,
                hatch="//", label="chat answers")
    axes[0].set_title("held-out loss")
    axes[0].legend(fontsize=8)
    axes[1].bar(x - 0.2, [stages[n]["stop_rate"] for n in names], 0.4, color=colors, label="turn ended")
    axes[1].bar(x + 0.2, [stages[n]["exact_match"] for n in names], 0.4, color=colors, alpha=0.45, hatch="//",
                label="exact answer")
    axes[1].set_title("fixed prompts (share)")
    axes[1].legend(fontsize=8)
    axes[2].bar(x, [stages[n]["rm_score"] for n in names], color=colors)
    axes[2].set_title("reward-model score, fixed prompts")
    for ax in axes:
        ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return plot.to_png(fig)


def _samples_html(samples: list[dict]) -> str:
    import html
    head = "".join(f"<th>{html.escape(k)}</th>" for k in samples[0])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(repr(v) if k in STAGES else v)}</td>" for k, v in s.items())
                   + "</tr>" for s in samples)
    return ("<!doctype html><html><head><meta charset='utf-8'><style>body{font-family:sans-serif;font-size:13px}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
            f"</style></head><body><table><tr>{head}</tr>{rows}</table></body></html>")
