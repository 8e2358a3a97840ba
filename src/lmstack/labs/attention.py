"""Lab 3: attention. One token's attention by hand, per-head heatmaps, the causal mask verified.

On the tiny tinyworld LM (toy.tiny_lm):
  - by hand, in float64 numpy from the raw weights: the first block's q, k, v for one query
    token, RoPE written out (pairs (i, i + d/2) rotated by position x theta^(-2i/d)),
    softmax(q.k / sqrt(d)) and the weighted sum of v, then the output projection, residual and
    MLP. Compared with `Transformer.introspect` (its attention weights and the block output);
  - heatmaps of every head of every layer on one sentence;
  - the causal mask: change the token at position j and compare logits before and after. A
    causal model's positions < j must not move at all; positions >= j must (else the
    perturbation did nothing). The same weights under a bidirectional mask are the control:
    there, earlier positions do move, so the check can fail.
"""
from __future__ import annotations

import numpy as np
import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import tiny_lm
from lmstack.model import Transformer


def by_hand(model: Transformer, ids: torch.Tensor, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Block 0 at query position t, written out in float64: (attention weights (H, t+1), block
    output (C,)). ids: (1, T). The norms and the MLP are the library's; the attention is not."""
    cfg = model.config
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    blk = model.blocks[0]
    with torch.no_grad():
        x = model.introspect(ids)["hidden_states"][0][0]                   # (T, C) token embeddings
        hx = blk.attn_norm(x).double().numpy()                             # (T, C)
    W = blk.attn.qkv.weight.detach().double().numpy()                      # ((H + 2 KV) D, C) rows [q | k | v]
    Wo = blk.attn.proj.weight.detach().double().numpy()                    # (C, H D)
    half = D // 2
    inv_freq = cfg.rope_theta ** (-np.arange(half) * 2.0 / D)              # theta^(-2i/d)

    def rope(vec: np.ndarray, pos: int) -> np.ndarray:                     # rotate pair (i, i + d/2)
        a, b = vec[:half], vec[half:]
        c, s = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
        return np.concatenate([a * c - b * s, b * c + a * s])

    weights, heads = [], []
    for h in range(H):
        g = h // (H // KV)                                                 # the K/V head this query head reads
        q = rope(W[h * D:(h + 1) * D] @ hx[t], t)
        k = np.stack([rope(W[(H + g) * D:(H + g + 1) * D] @ hx[j], j) for j in range(t + 1)])   # (t+1, D)
        v = np.stack([W[(H + KV + g) * D:(H + KV + g + 1) * D] @ hx[j] for j in range(t + 1)])
        scores = k @ q / np.sqrt(D)                                        # (t+1,): keys 0..t only (causal)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        weights.append(p)
        heads.append(p @ v)                                                # (D,)
    attn_out = Wo @ np.concatenate(heads)                                  # (C,)
    with torch.no_grad():
        mid = x[t] + torch.from_numpy(attn_out).float()
        out = mid + blk.mlp(blk.mlp_norm(mid[None]))[0]
    return np.stack(weights), out.double().numpy()


def run(ctx: LabContext) -> LabResult:
    lm, data = tiny_lm(ctx)
    model, tok = lm.model, data.tokenizer
    cfg = model.config
    text = "once upon a time, there lived a cat called tom. one day, tom went to the park with his friend."
    ids = torch.tensor([tok.encode(text)[:ctx.pick(24, 32)]])
    T = ids.shape[1]
    t = T - 1
    with torch.no_grad():
        look = model.introspect(ids)
    hand_w, hand_out = by_hand(model, ids, t)
    lib_w = look["attentions"][0][0, :, t, :t + 1].double().numpy()       # (H, t+1)
    lib_out = look["hidden_states"][1][0, t].double().numpy()
    diff_w = float(np.abs(hand_w - lib_w).max())
    diff_out = float(np.abs(hand_out - lib_out).max())

    # the causal mask: perturb position j, look before and after it
    j = T // 2
    bumped = ids.clone()
    bumped[0, j] = (ids[0, j] + 1) % cfg.vocab_size
    bidir = Transformer(cfg.replace(mask="bidirectional")).eval()
    bidir.load_state_dict(model.state_dict())
    with torch.no_grad():
        change = (model(ids) - model(bumped)).abs().amax(-1)[0]            # (T,) max |logit change| per position
        change_bi = (bidir(ids) - bidir(bumped)).abs().amax(-1)[0]
    before, after = float(change[:j].max()), float(change[j:].min())
    before_bi = float(change_bi[:j].max())

    prev_token = {f"layer{L}.head{h}": float(a[0, h].diagonal(-1).mean())
                  for L, a in enumerate(look["attentions"]) for h in range(cfg.n_head)}
    holds = diff_w < 1e-4 and diff_out < 1e-4 and before == 0.0 and after > 1e-3 and before_bi > 1e-3
    insight = Insight(
        "Attention is exactly softmax(q.k/sqrt(d)) weighting of v, and the causal mask hides the future completely",
        holds, f"by hand vs library: weights differ by at most {diff_w:.1e} and the block output by {diff_out:.1e}; "
               f"changing token {j} moves earlier logits by {before:.1e} (exactly 0 means hidden) and every later "
               f"position by at least {after:.2f}, while the same weights with a bidirectional mask move earlier "
               f"logits by {before_bi:.2f}")
    numbers = {"tokens": T, "query_position": t, "n_head": cfg.n_head, "head_dim": cfg.head_dim,
               "hand_vs_library": {"max_abs_diff_weights": diff_w, "max_abs_diff_block_output": diff_out},
               "causal_check": {"perturbed_position": j, "max_change_before": before, "min_change_from": after,
                                "bidirectional_max_change_before": before_bi},
               "mean_attention_to_previous_token": prev_token,
               "tiny_lm_val_loss": lm.result["val_loss"]}
    labels = [tok.decode([i]) for i in ids[0].tolist()]
    figures = [
        Figure("by_hand", f"Attention weights of the last token ('{labels[t].strip()}'), head by head: by hand "
               f"(bars) and the library's introspect (dots)", png=_by_hand_png(hand_w, lib_w, labels)),
        Figure("heads", "Every head of every layer on one sentence (rows: queries, columns: keys)",
               png=_heads_png(look["attentions"], labels)),
        Figure("causal", f"Max |change| of the logits at each position after changing token {j}",
               png=_causal_png(change.numpy(), change_bi.numpy(), j)),
    ]
    built = [f"the tiny tinyworld LM ({cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, RoPE) trained by "
             f"the Trainer (shared with other labs)",
             "block 0's attention for one token in float64 numpy from the raw q/k/v/proj weights, RoPE by hand",
             "introspect() heatmaps for every head", "a causal check by perturbing one token, with a bidirectional "
             "copy of the same weights as the control"]
    return LabResult(built, numbers, figures, insight)


def _by_hand_png(hand: np.ndarray, lib: np.ndarray, labels: list[str]) -> bytes:
    H, n = hand.shape
    fig, axes = plot.subplots(ncols=1, nrows=H, width=9.0, height=1.6 * H, sharex=True)
    for h, ax in enumerate(np.atleast_1d(axes)):
        ax.bar(range(n), hand[h], color=plot.COLORS[0], alpha=0.6, label="by hand")
        ax.plot(range(n), lib[h], "o", color=plot.COLORS[1], markersize=3, label="introspect")
        ax.set_ylabel(f"head {h}")
        if h == 0:
            ax.legend(fontsize=7)
    ax.set_xticks(range(n), [repr(s)[1:-1] for s in labels[:n]], rotation=70, fontsize=7)
    return plot.to_png(fig)


def _heads_png(attentions: list[torch.Tensor], labels: list[str]) -> bytes:
    L, H = len(attentions), attentions[0].shape[1]
    fig, axes = plot.subplots(ncols=H, nrows=L, width=2.6 * H, height=2.6 * L)
    axes = np.array(axes).reshape(L, H)
    for layer in range(L):
        for h in range(H):
            ax = axes[layer, h]
            ax.imshow(attentions[layer][0, h].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {h}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    return plot.to_png(fig)


def _causal_png(change: np.ndarray, change_bi: np.ndarray, j: int) -> bytes:
    fig, ax = plot.subplots(width=8.0, height=3.6)
    xs = np.arange(len(change))
    ax.bar(xs - 0.2, change, 0.4, label="causal (the model)", color=plot.COLORS[0])
    ax.bar(xs + 0.2, change_bi, 0.4, label="bidirectional (same weights)", color=plot.COLORS[3])
    ax.axvline(j, linestyle=":", color="#333", label=f"changed token {j}")
    ax.set_xlabel("position")
    ax.set_ylabel("max |logit change|")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return plot.to_png(fig)
