"""Lab 11: pretraining objectives. Masked, causal and prefix LM on the same data, through the
Trainer's built-in objectives (TrainConfig.objective), with loss curves and what each model
writes or fills in.

  causal  next token at every position, causal attention (GPT);
  masked  15% of positions chosen, 80/10/10 mask/random/kept, bidirectional attention, loss on
          the chosen positions only (BERT); the tokenizer has no mask token, so the model gets
          one extra vocabulary row for it;
  prefix  a random prefix per row seen bidirectionally, loss on the tokens after it (T5/UniLM).
Their training losses are not comparable as they stand: each counts other tokens with other
context. So the models are also scored on the same targets: the masked LM's loss on blanked
tokens against the causal LM's loss on those very tokens (which it predicts from the left
only), and the prefix LM against the causal LM on the second half of held-out rows given the
first half. Samples: the causal model through the engine (greedy), the prefix model by a
greedy loop (the engine serves causal models only), the masked model filling blanks.
"""
from __future__ import annotations

import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import tiny_lm_config, tinyworld_data, train
from lmstack.train import IGNORE_INDEX, Batch, MaskedLM, PrefixLM, token_loss

SEQ = 32
OBJECTIVES = ("causal", "masked", "prefix")


@torch.no_grad()
def loss_on(model, batch: Batch) -> float:
    logits = model(batch.input_ids, prefix_lens=batch.prefix_lens) if batch.prefix_lens is not None \
        else model(batch.input_ids)
    return float(token_loss(logits, batch.targets))


def run(ctx: LabContext) -> LabResult:
    steps = ctx.pick(100, 800)
    data = tinyworld_data(ctx.seed)
    V = data.vocab_size
    runs = {}
    for obj in OBJECTIVES:
        runs[obj] = train(ctx, obj, tiny_lm_config(V, context_length=SEQ), steps=steps, data=data, seq_len=SEQ,
                          batch_size=ctx.pick(8, 16), lr=6e-3, eval_every=max(1, steps // 5), eval_batches=8,
                          objective=obj)
    toks = torch.from_numpy(data.tokens("val")[: 64 * (SEQ + 1)].reshape(64, SEQ + 1).copy())
    x, y = toks[:, :-1], toks[:, 1:]
    g = torch.Generator().manual_seed(ctx.seed)
    masked = MaskedLM(mask_id=V, vocab_size=V).make_batch(x, y, g)         # mask id = the extra row
    chosen = masked.targets != IGNORE_INDEX
    # the causal LM on the blanked tokens: position t-1 predicts token t from the left only
    left = torch.full_like(x, IGNORE_INDEX)
    left[:, :-1] = torch.where(chosen[:, 1:], x[:, 1:], IGNORE_INDEX)
    half = torch.full((x.shape[0],), SEQ // 2)
    prefix_batch = Batch(x, PrefixLM.targets_for(y, half), half)
    scores = {"masked LM, blanked tokens (both sides)": loss_on(runs["masked"].model, masked),
              "causal LM, same tokens (left only)": loss_on(runs["causal"].model, Batch(x, left)),
              "prefix LM, 2nd half given 1st": loss_on(runs["prefix"].model, prefix_batch),
              "causal LM, 2nd half given 1st": loss_on(runs["causal"].model, Batch(x, prefix_batch.targets))}
    share = {"causal": 1.0, "masked": float(chosen.float().mean()),
             "prefix": float(PrefixLM().make_batch(x, y, g).targets.ne(IGNORE_INDEX).float().mean())}

    samples = _samples(runs, data.tokenizer, V)
    both, left_only = scores["masked LM, blanked tokens (both sides)"], scores["causal LM, same tokens (left only)"]
    second_p, second_c = scores["prefix LM, 2nd half given 1st"], scores["causal LM, 2nd half given 1st"]
    holds = share["causal"] > share["prefix"] > share["masked"] and second_c < second_p
    insight = Insight(
        "A batch teaches the causal LM at every position, the prefix LM at about half and the masked LM at 15%, so "
        "after the same steps the causal LM predicts next tokens best",
        holds, f"{share['causal']:.0%}, {share['prefix']:.0%} and {share['masked']:.0%} of positions carry a loss; "
               f"on the second half of held-out rows the causal LM scores {second_c:.2f} and the prefix LM "
               f"{second_p:.2f}; on the same blanked tokens the masked LM, which sees both sides, scores {both:.2f} "
               f"against the causal LM's {left_only:.2f} from the left only"
               + (" (both sides win here)" if both < left_only else " (too few masked tokens seen yet to win)"))
    numbers = {"steps": steps, "seq_len": SEQ,
               "final_train_loss": {k: r.result["train_loss"] for k, r in runs.items()},
               "final_val_loss_own_objective": {k: r.result["val_loss"] for k, r in runs.items()},
               "same_targets": scores, "share_of_positions_with_loss": share, "samples": samples}
    figures = [
        Figure("curves", "Val loss of each objective on its own targets (not comparable across objectives: other "
               "tokens, other context)", png=plot.curves_png({k: r.curve("val") for k, r in runs.items()},
                                                            "pretraining objectives", "step", "loss (nats/token)",
                                                            styles={k: "o-" for k in runs})),
        Figure("same_targets", "The same targets scored by different models", png=plot.bars_png(
            scores, "loss on the same targets", "loss (nats/token)")),
    ]
    built = [f"three tiny tinyworld LMs trained {steps} steps each by the Trainer with objective causal, masked "
             f"and prefix (TrainConfig.objective)", "scores on shared targets: blanked tokens, second halves",
             "greedy samples (causal via the engine, prefix by a greedy loop) and blank filling (masked)"]
    notes = [f"{k}: {v}" for k, v in samples.items()]
    return LabResult(built, numbers, figures, insight, notes)


@torch.no_grad()
def _samples(runs: dict, tok, V: int) -> dict[str, str]:
    prompt = "once upon a time,"
    causal = LLM(runs["causal"].model, tokenizer=tok, device="cpu", kv_cache_tokens=1024)
    out = {"causal (engine, greedy)": prompt + causal.generate([prompt], SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].text}
    ids = tok.encode(prompt)
    n_prompt = len(ids)
    model = runs["prefix"].model
    while len(ids) < min(SEQ, n_prompt + 20):       # prefix LM: the prompt bidirectional, the rest causal
        logits = model(torch.tensor([ids]), prefix_lens=torch.tensor([n_prompt]))
        ids.append(int(logits[0, -1].argmax()))
    out["prefix (greedy loop)"] = tok.decode(ids)
    text = "one day, the cat went to the park with a friend."
    ids = torch.tensor([tok.encode(text)[:SEQ]])
    blanks = torch.zeros_like(ids, dtype=torch.bool)
    blanks[0, 2::4] = True
    filled = runs["masked"].model(ids.masked_fill(blanks, V)).argmax(-1).clamp(max=V - 1)
    shown = [f"[{tok.decode([int(filled[0, i])])}]" if blanks[0, i] else tok.decode([int(ids[0, i])])
             for i in range(ids.shape[1])]
    out["masked (fill the [blanks])"] = "".join(shown) + f"  (original: {text})"
    return out
