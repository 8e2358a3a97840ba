"""Lab 10: normalization and activations. LayerNorm, RMSNorm or none; GELU, ReLU, SwiGLU or none;
each model retrained, and the activations looked at layer by layer.

Six tiny tinyworld LMs, identical but for one part, trained alike by the Trainer:
  RMSNorm + SwiGLU (the baseline, Llama's choice), LayerNorm + SwiGLU (GPT-2's norm),
  no norm + SwiGLU (every norm stripped by lmstack.model.ablate.strip_norms), RMSNorm + GELU,
  RMSNorm + ReLU, and RMSNorm + no activation (a ReLU MLP with its nonlinearity stripped:
  the MLP becomes one linear map, so the model's only nonlinearities left are the norms and the
  attention softmax).
Then, on held-out text, the residual stream after the embeddings and after each block
(`Transformer.introspect`'s hidden states, before the final norm): its RMS per layer and its
spread. A pre-norm block adds its output to the stream without normalising the stream itself;
the norms only rescale what each sublayer reads. Without them a sublayer reads the stream at
whatever scale it has grown to.
"""
from __future__ import annotations

import numpy as np
import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import build_model, tiny_lm_config, tinyworld_data, train
from lmstack.model.ablate import strip_activations, strip_norms
from lmstack.train import NonFiniteLossError

SEQ = 32
VARIANTS = {   # name -> (ModelConfig fields, what to strip)
    "RMSNorm + SwiGLU": ({"norm": "rmsnorm", "mlp": "swiglu"}, None),
    "LayerNorm + SwiGLU": ({"norm": "layernorm", "mlp": "swiglu"}, None),
    "no norm + SwiGLU": ({"norm": "rmsnorm", "mlp": "swiglu"}, "norms"),
    "RMSNorm + GELU": ({"norm": "rmsnorm", "mlp": "gelu"}, None),
    "RMSNorm + ReLU": ({"norm": "rmsnorm", "mlp": "relu"}, None),
    "RMSNorm + no activation": ({"norm": "rmsnorm", "mlp": "relu"}, "activations"),
}


@torch.no_grad()
def stream_stats(model, held: torch.Tensor) -> dict:
    """Per layer (embeddings, then each block's output, before the final norm): RMS and the
    1/25/50/75/99th percentiles of the residual stream's values."""
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, out: outputs.append(out)) for blk in model.blocks]
    try:
        layers = [model.introspect(held)["hidden_states"][0], *outputs]
    finally:
        for h in hooks:
            h.remove()
    out = {"rms": [], "percentiles": []}
    for x in layers:
        v = x.float().flatten()
        out["rms"].append(float(v.square().mean().sqrt()))
        out["percentiles"].append([float(q) for q in np.percentile(v.numpy(), [1, 25, 50, 75, 99])])
    return out


def run(ctx: LabContext) -> LabResult:
    steps = ctx.pick(80, 800)
    data = tinyworld_data(ctx.seed)
    held = torch.from_numpy(data.tokens("val")[: 32 * SEQ].reshape(32, SEQ).copy())
    res = {}
    for name, (fields, strip) in VARIANTS.items():
        model = build_model(tiny_lm_config(data.vocab_size, context_length=SEQ, **fields), ctx.seed)
        if strip == "norms":
            strip_norms(model)
        elif strip == "activations":
            strip_activations(model)
        try:
            r = train(ctx, name.replace(" ", "").replace("+", "_"), model, steps=steps, data=data, seq_len=SEQ,
                      batch_size=ctx.pick(8, 16), lr=6e-3, eval_every=max(1, steps // 6), eval_batches=8)
        except NonFiniteLossError as e:        # a real outcome of removing a norm: record it
            res[name] = {"diverged": True, "error": str(e).split(";")[0]}
            continue
        res[name] = {"diverged": False, "val_loss": r.result["val_loss"], "curve": r.curve("val"),
                     **stream_stats(r.model, held)}
    ok = {k: v for k, v in res.items() if not v["diverged"]}
    base = res["RMSNorm + SwiGLU"]
    no_norm, relu, linear = res["no norm + SwiGLU"], res["RMSNorm + ReLU"], res["RMSNorm + no activation"]
    growth = lambda v: v["rms"][-1] / v["rms"][0]   # noqa: E731  (how much the stream grows through the stack)
    norm_hurts = no_norm["diverged"] or no_norm["val_loss"] > base["val_loss"] + 0.02
    act_hurts = linear["diverged"] or (not relu["diverged"] and linear["val_loss"] > relu["val_loss"] + 0.02)
    holds = norm_hurts and act_hurts

    def loss_of(v):
        return "diverged" if v["diverged"] else f"{v['val_loss']:.3f}"
    insight = Insight(
        "Both the norm and the nonlinearity earn their place: removing either one and retraining gives a worse model",
        holds, f"val loss {loss_of(base)} with RMSNorm, {loss_of(res['LayerNorm + SwiGLU'])} with LayerNorm and "
               f"{loss_of(no_norm)} with no norm; {loss_of(relu)} with ReLU, {loss_of(res['RMSNorm + GELU'])} with "
               f"GELU, {loss_of(base)} with SwiGLU and {loss_of(linear)} with no activation"
               + ("" if no_norm["diverged"] else f"; without norms the residual stream grows {growth(no_norm):.1f}x "
                  f"through the stack (RMSNorm: {growth(base):.1f}x)"))
    numbers = {"steps": steps, "seq_len": SEQ,
               "models": {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in res.items()}}
    figures = [
        Figure("loss", "Val loss during training, one part changed per model", png=plot.curves_png(
            {k: v["curve"] for k, v in ok.items()}, "norms and activations", "step", "loss (nats/token)",
            styles={k: "o-" for k in ok})),
        Figure("stream_rms", "RMS of the residual stream after the embeddings (0) and after each block",
               png=plot.curves_png({k: (list(range(len(v["rms"]))), v["rms"]) for k, v in ok.items()},
                                   "residual stream scale, layer by layer", "layer", "RMS",
                                   styles={k: "o-" for k in ok})),
        Figure("stream_spread", "Spread of the residual stream's values per layer (1st-99th percentile bars, "
               "25th-75th boxes)", png=_spread_png(ok)),
    ]
    built = [f"{len(VARIANTS)} tiny tinyworld LMs (2 layers, width 64) trained {steps} steps each by the Trainer, "
             f"differing only in norm or activation", "norms stripped with lmstack.model.ablate.strip_norms and the "
             "MLP nonlinearity with strip_activations", "residual-stream statistics per layer from "
             "Transformer.introspect on held-out text"]
    notes = [f"{k} diverged: {v['error']}" for k, v in res.items() if v["diverged"]]
    return LabResult(built, numbers, figures, insight, notes)


def _spread_png(ok: dict) -> bytes:
    fig, ax = plot.subplots(width=10.0, height=4.2)
    n = len(ok)
    for i, (name, v) in enumerate(ok.items()):
        for layer, p in enumerate(v["percentiles"]):
            x = layer + (i - (n - 1) / 2) * 0.12
            ax.plot([x, x], [p[0], p[4]], color=plot.COLORS[i], linewidth=1)
            ax.add_patch(plot.pyplot().Rectangle((x - 0.045, p[1]), 0.09, p[3] - p[1], color=plot.COLORS[i],
                                                 label=name if layer == 0 else None))
    ax.set_xticks(range(len(next(iter(ok.values()))["percentiles"])))
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("activation value")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return plot.to_png(fig)
