"""Lab 2: positions. Sinusoidal, learned, RoPE, ALiBi and none, on a task only order can solve.

The task (toy.offset_copy): random tokens, and position t must output the token two places
back. The same tokens in another order have other answers, so a model blind to order can at
best guess among the tokens it has seen: its loss floor, the "order-blind baseline", is
computed exactly from the data. Each scheme trains the same one-block model through the
Trainer. Then, on held-out rows:
  - attention entropy of the block, per query, divided by log(#visible keys): 1 = uniform;
  - a shuffle check that the ablation really removes position: shuffle the tokens before the
    last one and measure how much the block's output at the last position moves (with no
    positions, attention over a set of keys cannot see their order: it must not move; an
    additive scheme moves it only through the attention weights, little while they are flat);
  - an animated 3-D view of a toy sentence being position-encoded by each scheme.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lmstack.labs import plot, widgets
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import TaskBatches, offset_copy, train
from lmstack.model import ModelConfig
from lmstack.model.positions import apply_rope, rope_inv_freq, sinusoidal_embedding
from lmstack.train import IGNORE_INDEX

SCHEMES = ("sinusoidal", "learned", "rope", "alibi", "none")
VOCAB, SEQ, OFFSET = 16, 24, 2


def order_blind_loss(batch) -> float:
    """The best loss without order: predict each token in proportion to how often it occurs
    among the tokens seen so far (the target is always one of them)."""
    x, y = batch.input_ids, batch.targets
    losses = []
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if y[b, t] != IGNORE_INDEX:
                seen = x[b, : t + 1]
                losses.append(-math.log(int((seen == y[b, t]).sum()) / (t + 1)))
    return float(np.mean(losses))


@torch.no_grad()
def attention_entropy(model, ids: torch.Tensor, skip: int) -> float:
    """Mean normalised entropy of the first block's attention rows for queries t >= skip."""
    probs = model.introspect(ids)["attentions"][0].float()                  # (B, H, T, T)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)                   # (B, H, T)
    visible = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32)        # query t sees t+1 keys
    return float((ent[..., skip:] / visible[skip:].log()).mean())


@torch.no_grad()
def shuffle_change(model, ids: torch.Tensor, seed: int) -> float:
    """Relative change of the first block's output at the last position when the tokens
    before it are shuffled (ids: (1, T))."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(ids.shape[1] - 1, generator=g)
    shuffled = torch.cat([ids[:, :-1][:, perm], ids[:, -1:]], dim=1)
    a = model.introspect(ids)["hidden_states"][1][0, -1]
    b = model.introspect(shuffled)["hidden_states"][1][0, -1]
    return float((a - b).abs().max() / a.abs().mean())


def run(ctx: LabContext) -> LabResult:
    steps = ctx.pick(80, 1500)
    make = offset_copy(VOCAB, SEQ, OFFSET)
    val = TaskBatches(make, 32, ctx.seed + 7919)
    runs = {}
    for pe in SCHEMES:
        cfg = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, n_embd=32, context_length=SEQ, pos_emb=pe)
        runs[pe] = train(ctx, pe, cfg, steps=steps, batches=TaskBatches(make, ctx.pick(16, 32), ctx.seed),
                         val_batches=TaskBatches(make, 32, ctx.seed + 7919), seq_len=SEQ, lr=1.5e-2,
                         eval_every=max(1, steps // 10), eval_batches=2)
    held = val.next_batch()
    baseline = order_blind_loss(held)
    loss = {pe: runs[pe].final("val") for pe in SCHEMES}
    entropy = {pe: attention_entropy(runs[pe].model, held.input_ids, OFFSET) for pe in SCHEMES}
    moved = {pe: shuffle_change(runs[pe].model, held.input_ids[:1], ctx.seed) for pe in SCHEMES}

    with_pos = [pe for pe in SCHEMES if pe != "none"]
    best = min(with_pos, key=loss.get)
    # a model blind to order cannot beat the order-blind optimum (up to noise); a scheme should beat it by far
    holds = (loss["none"] > baseline - 0.15 and loss[best] < baseline - 0.5 and entropy["none"] > entropy[best])
    insight = Insight(
        "Without positions a transformer cannot solve an order task: its attention spreads evenly and its loss "
        "stays at the order-blind baseline, while a position scheme goes far below it",
        holds, f"val loss {loss['none']:.2f} with no positions against an order-blind baseline of {baseline:.2f}; "
               f"{', '.join(f'{pe} {loss[pe]:.2f}' for pe in with_pos)}; attention entropy {entropy['none']:.2f} "
               f"with none against {entropy[best]:.2f} with {best} (1 = uniform); shuffling the context moves the "
               f"output by {moved['none']:.1e} with none and at least {min(moved[pe] for pe in with_pos):.2f} "
               f"with a scheme")
    numbers = {"task": {"vocab": VOCAB, "seq_len": SEQ, "offset": OFFSET, "steps": steps},
               "val_loss": loss, "order_blind_baseline": baseline, "uniform_baseline": math.log(VOCAB),
               "attention_entropy": entropy, "shuffle_change": moved}
    figures = [
        Figure("loss", "Validation loss on the copy-two-back task, per position scheme",
               png=plot.curves_png({pe: runs[pe].curve("val") for pe in SCHEMES}, "copy two back: val loss",
                                   "step", "loss (nats/token)", styles={pe: "o-" for pe in SCHEMES},
                                   hlines={"order-blind baseline": baseline, "uniform guess": math.log(VOCAB)})),
        Figure("attention", "First-block attention (mean over heads) on one held-out row: a scheme puts weight "
               "two places back (the off-diagonal); with none it spreads over the whole prefix",
               png=_heatmaps(runs, held.input_ids[:1])),
        Figure("entropy", "Attention entropy / log(visible keys): 1 is uniform attention",
               png=plot.bars_png(entropy, "attention entropy (normalised)", "entropy / log(keys)")),
        Figure("encode_3d", "A toy sentence being position-encoded, in 3-D (drag to turn, slide or play)",
               html=_encode_3d(runs["learned"].model, ctx.seed)),
    ]
    built = [f"{len(SCHEMES)} one-block models (width 32, 4 heads), one per position scheme, trained {steps} steps "
             f"each by the Trainer on random {SEQ}-token rows over {VOCAB} symbols: output the token {OFFSET} back",
             "the order-blind baseline computed exactly from held-out rows",
             "attention entropy and a context-shuffle check on held-out rows",
             "a self-contained HTML/JS 3-D animation of sinusoidal, learned, RoPE, ALiBi and no positions"]
    return LabResult(built, numbers, figures, insight)


def _heatmaps(runs: dict, ids: torch.Tensor) -> bytes:
    fig, axes = plot.subplots(ncols=len(SCHEMES), width=3.0 * len(SCHEMES), height=3.2)
    for ax, pe in zip(axes, SCHEMES):
        with torch.no_grad():
            att = runs[pe].model.introspect(ids)["attentions"][0][0].mean(0)    # (T, T)
        ax.imshow(att.numpy(), cmap="viridis", vmin=0, vmax=max(0.3, float(att[OFFSET:].max())))
        ax.set_title(pe)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    return plot.to_png(fig)


def _encode_3d(learned_model, seed: int) -> str:
    """Keyframes of a toy sentence as position information is added (t: 0 -> 1)."""
    words = "the cat sat on the mat and the cat ran".split()
    rng = np.random.default_rng(seed)
    table = {w: rng.normal(0, 0.35, 4) for w in dict.fromkeys(words)}      # a toy 4-d embedding per word
    base = torch.tensor(np.stack([table[w] for w in words]), dtype=torch.float32)   # (T, 4)
    T = len(words)
    pos = torch.arange(T)[None]
    ts = np.linspace(0, 1, 11)
    labels = [f"{w}@{i}" for i, w in enumerate(words)]
    sets = {}
    pe = sinusoidal_embedding(pos, 4)[0]                                    # (T, 4): sin p, cos p, sin p/100, ...
    sets["sinusoidal"] = {"frames": [(base + t * 0.6 * pe)[:, :3].tolist() for t in ts],
                          "note": "adds a fixed vector per position: sin and cos of the position at several "
                                  "frequencies (the fastest pair traces a circle, the slow one drifts)"}
    wpe = learned_model.wpe.weight[:T].detach()
    proj = torch.linalg.svd(wpe - wpe.mean(0), full_matrices=False)[2][:3].T   # top 3 principal directions
    learned = (wpe - wpe.mean(0)) @ proj
    learned = 0.6 * learned / learned.norm(dim=1).max()
    sets["learned"] = {"frames": [(base[:, :3] + t * learned).tolist() for t in ts],
                       "note": "adds a trained vector per position (the learned model's table, top 3 principal "
                               "directions): no formula, and nothing for positions it never saw"}
    inv = rope_inv_freq(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=4, pos_emb="rope"))      # (2,)
    frames = []
    for t in ts:
        ang = t * pos[0, :, None].float() * inv                                # (T, 2)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        rot = apply_rope(base[None, None], cos[None, None], sin[None, None])[0, 0]   # (T, 4), pairs (0,2), (1,3)
        frames.append(rot[:, [0, 2, 1]].tolist())
    sets["rope"] = {"frames": frames, "note": "rotates each pair of dims by position x frequency: lengths are "
                                              "kept, and q.k depends only on the distance between positions"}
    sets["alibi"] = {"frames": [base[:, :3].tolist()] * 2,
                     "note": "leaves the vectors alone: it subtracts slope x distance from the attention scores"}
    sets["none"] = {"frames": [base[:, :3].tolist()] * 2,
                    "note": "no position at all: the three 'the' and two 'cat' are the very same points"}
    for s in sets.values():
        s["labels"] = labels
    return widgets.points_3d("Position encodings of a toy sentence", sets, ("d0", "d1", "d2"),
                             "Each point is one token of 'the cat sat on the mat and the cat ran' in a 4-d toy "
                             "embedding (3 dims shown). Slide 'encode' from 0 (token only) to 1 (token + position).")
