"""Lab 4: queries, keys, values, and stacking blocks. Build one block, stack it, break it.

Breaking (toy.offset_copy): random symbols, and each position must output the symbol two
places back. One block with learned positions solves it within a few dozen steps, by a query
that finds "two places back" among the keys and a value that carries the symbol. The block is
trained intact and, from the same initial weights, with each lesion of lmstack.model.ablate
applied throughout training: swap Q and K, swap K and V, zero Q, zero K, zero V. Then the
trained intact block is broken afterwards (Q/K or K/V swapped) and scored again.
What to expect, and why. Swapping Q and K (or K and V) before training only relabels two
learnable projections: the model can learn the same function, so training is unharmed. After
training the same swap scrambles learned roles and the loss jumps. Zeroing Q (or K) makes every
score 0, so attention averages the context uniformly: it can no longer pick a position.
Zeroing V makes attention output nothing: the block sees only the current symbol and the loss
stays at a uniform guess.

Stacking (toy.periodic): rows repeat a pattern of 3-8 distinct symbols, so once the pattern
has been seen the next symbol is the one that followed the current symbol's previous
occurrence. Finding that occurrence by content and copying its successor is what an induction
head does, which takes two attention layers; one block and a stack of blocks train alike.
"""
from __future__ import annotations

import math

import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import TaskBatches, build_model, offset_copy, periodic, train
from lmstack.model import ModelConfig
from lmstack.model.ablate import LESIONS, lesion_qkv
from lmstack.train import CausalLM

VOCAB, SEQ, OFFSET, PERIODS = 16, 24, 2, (3, 8)


def run(ctx: LabContext) -> LabResult:
    steps = ctx.pick(80, 600)

    def fit(name: str, model, make, pos: str, n: int = 1):
        if isinstance(model, str):   # "new": a fresh model of n blocks
            model = ModelConfig(vocab_size=VOCAB, n_layer=n, n_head=4, n_embd=32, context_length=SEQ, pos_emb=pos)
        return train(ctx, name, model, steps=steps, batches=TaskBatches(make, 16, ctx.seed),
                     val_batches=TaskBatches(make, 64, ctx.seed + 7919), seq_len=SEQ, lr=1e-2,
                     eval_every=max(1, steps // 8), eval_batches=1)

    copy = offset_copy(VOCAB, SEQ, OFFSET)
    block_cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, n_embd=32, context_length=SEQ, pos_emb="learned")
    runs = {"one block": fit("block", "new", copy, "learned")}
    for kind in LESIONS:
        model = build_model(block_cfg, ctx.seed)        # the same initial weights as the intact block
        lesion_qkv(model, kind)
        runs[kind] = fit(kind, model, copy, "learned")
    loss = {k: r.final("val") for k, r in runs.items()}
    pattern = periodic(VOCAB, SEQ, *PERIODS)
    stacks = {f"{n} block{'s' if n > 1 else ''}": fit(f"stack{n}", "new", pattern, "rope", n)
              for n in ctx.pick([1, 2], [1, 2, 4])}
    stack_loss = {k: r.final("val") for k, r in stacks.items()}

    # breaking the trained block afterwards
    held = TaskBatches(copy, 256, ctx.seed + 104729).next_batch()
    block = runs["one block"].model
    after = {}
    for kind in ("none", "swap_qk", "swap_kv"):
        hooks = lesion_qkv(block, kind) if kind != "none" else None
        with torch.no_grad():
            after[kind] = float(CausalLM().loss(block, held)[0])
        if hooks is not None:
            hooks.remove()

    base, uniform = loss["one block"], math.log(VOCAB)
    swaps = max(loss["swap_qk"], loss["swap_kv"])
    holds = (swaps < base + 0.3 and min(loss["zero_q"], loss["zero_k"]) > base + 1.0
             and loss["zero_v"] > max(loss["zero_q"], loss["zero_k"]) + 0.2 and loss["zero_v"] > uniform - 0.15)
    insight = Insight(
        "Swapping Q with K or K with V before training only relabels learnable weights and does no harm, while "
        "zeroing Q or K flattens attention and zeroing V cuts it off, so training stalls",
        holds, f"val loss {base:.2f} for the intact block, {loss['swap_qk']:.2f} with Q/K swapped and "
               f"{loss['swap_kv']:.2f} with K/V swapped; {loss['zero_q']:.2f} with Q zeroed, {loss['zero_k']:.2f} "
               f"with K zeroed, {loss['zero_v']:.2f} with V zeroed (a uniform guess is {uniform:.2f}); swapping Q/K "
               f"in the trained block afterwards raises its loss from {after['none']:.2f} to {after['swap_qk']:.2f}")
    numbers = {"breaking_task": {"vocab": VOCAB, "seq_len": SEQ, "offset": OFFSET, "steps": steps},
               "stacking_task": {"vocab": VOCAB, "seq_len": SEQ, "periods": list(PERIODS), "steps": steps},
               "val_loss": loss, "uniform_guess": uniform, "trained_block_broken_afterwards": after,
               "stacking_val_loss": stack_loss}
    figures = [
        Figure("lesions", "Val loss while training the one block intact and with each lesion applied from step 0",
               png=plot.curves_png({k: runs[k].curve("val") for k in ["one block", *LESIONS]},
                                   "breaking Q, K, V (copy the symbol two back)", "step", "loss (nats/token)",
                                   styles={k: "o-" for k in ["one block", *LESIONS]},
                                   hlines={"uniform guess": uniform})),
        Figure("after_training", "The trained block with Q/K or K/V swapped afterwards (same held-out rows)",
               png=plot.bars_png(after, "breaking a trained block", "loss (nats/token)",
                                 hline=("uniform guess", uniform))),
        Figure("stacking", "One block against a stack on in-context copying of repeated patterns",
               png=plot.curves_png({k: r.curve("val") for k, r in stacks.items()}, "stacking blocks", "step",
                                   "loss (nats/token)", styles={k: "o-" for k in stacks})),
    ]
    built = [f"a one-block transformer (width 32, 4 heads, learned positions) trained {steps} steps by the Trainer "
             f"to output the symbol {OFFSET} places back, intact and under each lesion of lmstack.model.ablate "
             f"(forward hooks on the fused qkv projection), from the same initial weights",
             "the trained block broken afterwards and re-scored",
             f"{' and '.join(stacks)} (RoPE) trained alike on in-context copying of repeated "
             f"{PERIODS[0]}-{PERIODS[1]}-symbol patterns"]
    return LabResult(built, numbers, figures, insight)
