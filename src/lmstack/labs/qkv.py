"""Lab 4: queries, keys, values, and stacking blocks. Build one block, stack it, break it.

Toy data (toy.periodic): each row repeats a pattern of 3-8 distinct symbols; once the pattern
has been seen, the next symbol is the one that followed the current symbol's previous
occurrence. Attention is the only way to read that from the context.

  - one block and a stack of blocks, trained alike by the Trainer;
  - the block trained again from the same initial weights with each lesion of
    lmstack.model.ablate applied throughout: swap Q and K, swap K and V, zero Q, zero K, zero V;
  - the trained block with Q/K or K/V swapped afterwards.
What to expect, and why. Swapping Q and K (or K and V) before training only relabels two
learnable projections: the model can learn the same function, so training is unharmed. After
training the same swap scrambles learned roles and the loss jumps. Zeroing Q (or K) makes every
score 0, so attention averages the context uniformly: it can no longer pick a position or a
symbol. Zeroing V makes attention output nothing: the block sees only the current symbol and
the loss stays at a uniform guess.
"""
from __future__ import annotations

import math

import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import TaskBatches, build_model, periodic, train
from lmstack.model import ModelConfig
from lmstack.model.ablate import LESIONS, lesion_qkv
from lmstack.train import CausalLM

VOCAB, SEQ, PERIODS = 16, 24, (3, 8)


def run(ctx: LabContext) -> LabResult:
    steps = ctx.pick(120, 1000)
    make = periodic(VOCAB, SEQ, *PERIODS)

    def cfg(n_layer: int) -> ModelConfig:
        return ModelConfig(vocab_size=VOCAB, n_layer=n_layer, n_head=4, n_embd=32, context_length=SEQ)

    def fit(name: str, model) -> object:
        return train(ctx, name, model, steps=steps, batches=TaskBatches(make, 32, ctx.seed),
                     val_batches=TaskBatches(make, 64, ctx.seed + 7919), seq_len=SEQ, lr=1e-2,
                     eval_every=max(1, steps // 8), eval_batches=1)

    runs = {"one block": fit("block", cfg(1))}
    for n in ctx.pick([2], [2, 4]):
        runs[f"stack of {n}"] = fit(f"stack{n}", cfg(n))
    for kind in LESIONS:
        model = build_model(cfg(1), ctx.seed)          # the same initial weights as the one block
        lesion_qkv(model, kind)
        runs[kind] = fit(kind, model)
    loss = {k: r.final("val") for k, r in runs.items()}

    # breaking the trained block afterwards
    held = TaskBatches(make, 256, ctx.seed + 104729).next_batch()
    block = runs["one block"].model
    after = {}
    for kind in ("none", "swap_qk", "swap_kv"):
        hooks = lesion_qkv(block, kind) if kind != "none" else None
        with torch.no_grad():
            after[kind] = float(CausalLM().loss(block, held)[0])
        if hooks is not None:
            hooks.remove()

    base, uniform = loss["one block"], math.log(VOCAB)
    stack = max((k for k in runs if k.startswith("stack")), key=lambda k: int(k.split()[-1]))
    swaps_fine = all(abs(loss[k] - base) < 0.1 for k in ("swap_qk", "swap_kv"))
    holds = (swaps_fine and min(loss["zero_q"], loss["zero_k"]) > base + 0.1
             and loss["zero_v"] > max(loss["zero_q"], loss["zero_k"]) + 0.2 and loss["zero_v"] > uniform - 0.15)
    insight = Insight(
        "Swapping Q with K or K with V before training only relabels learnable weights and does no harm, while "
        "zeroing Q or K flattens attention and zeroing V cuts it off, so training stalls",
        holds, f"val loss {base:.2f} for the intact block, {loss['swap_qk']:.2f} with Q/K swapped and "
               f"{loss['swap_kv']:.2f} with K/V swapped; {loss['zero_q']:.2f} with Q zeroed, {loss['zero_k']:.2f} "
               f"with K zeroed, {loss['zero_v']:.2f} with V zeroed (a uniform guess is {uniform:.2f}); swapping Q/K "
               f"in the trained block raises its loss from {after['none']:.2f} to {after['swap_qk']:.2f}; a "
               f"{stack} reaches {loss[stack]:.2f}")
    numbers = {"task": {"vocab": VOCAB, "seq_len": SEQ, "periods": list(PERIODS), "steps": steps},
               "val_loss": loss, "uniform_guess": uniform, "trained_block_broken_afterwards": after}
    order = ["one block", *[k for k in runs if k.startswith("stack")]]
    figures = [
        Figure("lesions", "Val loss while training the one block intact and with each lesion applied from step 0",
               png=plot.curves_png({k: runs[k].curve("val") for k in ["one block", *LESIONS]},
                                   "breaking Q, K, V", "step", "loss (nats/token)",
                                   styles={k: "o-" for k in ["one block", *LESIONS]},
                                   hlines={"uniform guess": uniform})),
        Figure("stacking", "One block against a stack of blocks on the same data",
               png=plot.curves_png({k: runs[k].curve("val") for k in order}, "stacking blocks", "step",
                                   "loss (nats/token)", styles={k: "o-" for k in order})),
        Figure("after_training", "The trained block with Q/K or K/V swapped afterwards (same held-out rows)",
               png=plot.bars_png(after, "breaking a trained block", "loss (nats/token)",
                                 hline=("uniform guess", uniform))),
    ]
    built = [f"a one-block transformer (width 32, 4 heads, RoPE) and a {stack}, trained {steps} steps each by the "
             f"Trainer on in-context copying of repeated {PERIODS[0]}-{PERIODS[1]}-symbol patterns",
             "the block retrained from the same initial weights under each lesion of lmstack.model.ablate "
             "(forward hooks on the fused qkv projection)", "the trained block broken afterwards and re-scored"]
    return LabResult(built, numbers, figures, insight)
