"""Lab 8: mixture of experts. A 2-expert and an n-expert router, expert utilisation per layer,
FLOPs per token against dense models of equal quality, and routing without the
load-balancing loss.

Every model is the same tiny tinyworld LM trained alike by the Trainer (which adds the MoE
auxiliary loss, `Transformer.aux_loss()`); only the MLP differs:
  - dense at two (full: three) widths: the loss-against-FLOPs line an MoE is measured on;
  - 2 experts, top-1: each token uses one of two MLPs (as many FLOPs as the dense model of
    the same width). With top-1, the renormalised gate weight is always 1, so the router is
    trained only by the balancing loss;
  - 8 experts, top-2 (Mixtral's routing), with the balancing loss (weight AUX = 0.05, five
    times Switch's 0.01 so that it acts within a short run) and without it (0).
FLOPs per token are `Transformer.flops_per_token` (6 x active parameters + attention). The
dense-equivalent FLOPs of an MoE: the FLOPs at which the dense models' loss (interpolated
linearly in log FLOPs) equals the MoE's. Utilisation: `expert_counts()` after a forward over
held-out tokens, summarised per layer by the normalised entropy of the token shares (1 =
perfectly even; 0 = every token on one expert), and the load-balancing loss itself on those
tokens (k when routing is even).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import tiny_lm_config, tinyworld_data, train
from lmstack.model.moe import MoE, load_balancing_loss

SEQ = 32
AUX = 0.05   # the balancing loss's weight: 5x Switch's 0.01, so that its effect shows within a short run


def utilisation(model, held: torch.Tensor) -> tuple[np.ndarray, float]:
    """((n_layer, n_expert) share of routed tokens per expert on `held` (B, T), the
    load-balancing loss n_expert * sum_e f_e P_e of that forward over all layers: k when even)."""
    with torch.no_grad():
        model(held)
    counts = model.expert_counts().double()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    lbl = load_balancing_loss(torch.cat([m.last_logits for m in layers]), torch.cat([m.last_experts for m in layers]),
                              model.config.n_expert)
    return (counts / counts.sum(1, keepdim=True)).numpy(), float(lbl)


def balance(shares: np.ndarray) -> np.ndarray:
    """Per-layer normalised entropy of expert shares: 1 = even, 0 = one expert takes all."""
    ent = -(shares * np.log(np.clip(shares, 1e-12, None))).sum(1)
    return ent / math.log(shares.shape[1])


def dense_equivalent(loss: float, dense: list[tuple[float, float]]) -> tuple[float | None, bool]:
    """(FLOPs at which the dense line reaches `loss`, whether that is extrapolated). dense:
    (flops, loss) points; linear in (log FLOPs, loss) between the two bracketing points, or
    along the last segment past them. None when the dense loss does not fall with FLOPs (a
    short run can leave the bigger dense model no better): there is no line to read."""
    pts = sorted(dense)
    if any(l1 >= l0 for (_, l0), (_, l1) in zip(pts, pts[1:])):
        return None, False
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if l1 <= loss <= l0:
            w = (loss - l0) / (l1 - l0)
            return math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0))), False
    (f0, l0), (f1, l1) = pts[-2], pts[-1]
    w = (loss - l0) / (l1 - l0)
    return math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0))), True


def run(ctx: LabContext) -> LabResult:
    steps = ctx.pick(100, 600)
    E = 8
    data = tinyworld_data(ctx.seed)
    held = torch.from_numpy(data.tokens("val")[: 64 * SEQ].reshape(64, SEQ).copy())
    widths = ctx.pick([32, 64], [32, 64, 128])
    variants = {f"dense {w}": {"n_embd": w} for w in widths}
    moe = {"2 experts, top-1": dict(n_expert=2, n_expert_per_token=1),
           f"{E} experts, top-2": dict(n_expert=E, n_expert_per_token=2, moe_aux_loss_coef=AUX),
           f"{E} experts, top-2, no balancing loss": dict(n_expert=E, n_expert_per_token=2, moe_aux_loss_coef=0.0)}
    variants.update({k: {"n_embd": 64, **v} for k, v in moe.items()})
    res = {}
    for name, over in variants.items():
        cfg = tiny_lm_config(data.vocab_size, context_length=SEQ, mlp="gelu", **over)
        r = train(ctx, name.replace(" ", "_").replace(",", ""), cfg, steps=steps, data=data, seq_len=SEQ,
                  batch_size=ctx.pick(8, 16), lr=6e-3, eval_every=max(1, steps // 4), eval_batches=8)
        m = r.model
        res[name] = {"val_loss": r.result["val_loss"], "flops_per_token": int(m.flops_per_token(SEQ)),
                     "params": m.num_params(), "active_params": m.num_active_params(), "curve": r.curve("val")}
        if name in moe:
            shares, lbl = utilisation(m, held)
            res[name]["shares"] = shares.round(4).tolist()
            res[name]["load_balancing_loss"] = lbl
            res[name]["balance"] = balance(shares).round(4).tolist()
            res[name]["aux_loss_coef"] = m.config.moe_aux_loss_coef
    dense_pts = [(res[k]["flops_per_token"], res[k]["val_loss"]) for k in variants if k.startswith("dense")]
    for name in moe:
        eq, extrap = dense_equivalent(res[name]["val_loss"], dense_pts)
        res[name]["dense_equivalent_flops"] = eq
        res[name]["dense_equivalent_extrapolated"] = extrap
        res[name]["flops_saving"] = None if eq is None else eq / res[name]["flops_per_token"]
    main, noaux = f"{E} experts, top-2", f"{E} experts, top-2, no balancing loss"
    saving = res[main]["flops_saving"]
    b_on, b_off = min(res[main]["balance"]), min(res[noaux]["balance"])
    lbl_on, lbl_off = res[main]["load_balancing_loss"], res[noaux]["load_balancing_loss"]
    holds = b_off < b_on - 0.05 and lbl_off > lbl_on
    insight = Insight(
        "Without the load-balancing loss the router piles tokens onto a few experts, while the balancing loss keeps "
        "every expert in use",
        holds, f"{main}: the most uneven layer's utilisation entropy is {b_on:.2f} with the balancing loss and "
               f"{b_off:.2f} without (1 = even), and the load-balancing loss on held-out tokens is {lbl_on:.2f} "
               f"against {lbl_off:.2f} (2 = perfectly even for top-2)")
    if saving is None:
        equal = (f"Equal quality: the dense models' loss did not fall with size in this short run, so there is no "
                 f"dense line to read {main} off; see the full mode.")
    else:
        extrap = " (extrapolated past the dense points)" if res[main]["dense_equivalent_extrapolated"] else ""
        equal = (f"Equal quality: {main} holds {res[main]['params']:,} parameters but computes with "
                 f"{res[main]['active_params']:,} per token; its val loss {res[main]['val_loss']:.2f} is what the "
                 f"dense line reaches at {saving:.2f}x its FLOPs per token{extrap}, so "
                 + ("the router paid off in this run." if saving > 1 else
                    "in this run the router did not pay off (short runs favour the simpler dense model; the full "
                    "mode trains longer)."))
    notes = [equal,
             "With top-1 routing the gate weight of the one chosen expert is renormalised to 1, so the language-model "
             "loss gives the router no gradient: the 2-expert router learns only from the balancing loss."]
    numbers = {"steps": steps, "seq_len": SEQ, "n_expert": E, "models": {k: {kk: vv for kk, vv in v.items()
                                                                              if kk != "curve"}
                                                                          for k, v in res.items()}}
    figures = [
        Figure("utilisation", "Share of tokens routed to each expert, layer by layer, on held-out text",
               png=_util_png({k: res[k]["shares"] for k in moe})),
        Figure("loss_vs_flops", "Val loss against training FLOPs per token: the dense line and the MoE models",
               png=_flops_png(res, moe)),
        Figure("curves", "Val loss during training", png=plot.curves_png(
            {k: v["curve"] for k, v in res.items()}, "val loss", "step", "loss (nats/token)",
            styles={k: "o-" for k in res})),
    ]
    built = [f"{len(variants)} tiny tinyworld LMs (2 layers) trained {steps} steps each by the Trainer: dense at "
             f"widths "
             f"{widths}, and width-64 MoE with 2 experts (top-1) and {E} experts (top-2) with and without the "
             f"load-balancing loss", "expert utilisation from Transformer.expert_counts() on held-out tokens",
             "FLOPs per token from Transformer.flops_per_token and the dense-equivalent FLOPs of each MoE"]
    return LabResult(built, numbers, figures, insight, notes)


def _util_png(shares: dict[str, list]) -> bytes:
    n_layer = len(next(iter(shares.values())))
    fig, axes = plot.subplots(ncols=len(shares), nrows=n_layer, width=4.2 * len(shares), height=2.4 * n_layer)
    axes = np.array(axes).reshape(n_layer, len(shares))
    for j, (name, s) in enumerate(shares.items()):
        for layer in range(n_layer):
            ax = axes[layer, j]
            E = len(s[layer])
            ax.bar(range(E), s[layer], color=plot.COLORS[j])
            ax.axhline(1 / E, linestyle="--", color="#555")
            ax.set_ylim(0, 1)
            ax.set_title(f"{name}\nlayer {layer}" if layer == 0 else f"layer {layer}", fontsize=9)
            ax.set_xticks(range(E))
    return plot.to_png(fig)


def _flops_png(res: dict, moe: dict) -> bytes:
    fig, ax = plot.subplots(width=7.0, height=4.2)
    dense = sorted((v["flops_per_token"], v["val_loss"]) for k, v in res.items() if k.startswith("dense"))
    ax.plot([d[0] for d in dense], [d[1] for d in dense], "o-", color="#333", label="dense")
    for i, name in enumerate(moe):
        ax.plot(res[name]["flops_per_token"], res[name]["val_loss"], "*", markersize=14, color=plot.COLORS[i + 1],
                label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per token")
    ax.set_ylabel("val loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return plot.to_png(fig)
