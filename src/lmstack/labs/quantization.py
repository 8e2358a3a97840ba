"""Lab 14: quantization. Accuracy against bit width (32 / 16 / 8 / 4 / 3), post-training
quantization (PTQ) against quantization-aware training (QAT), and export to GGUF.

On the tiny tinyworld LM (toy.tiny_lm), every linear of every block is rounded, the
embedding (tied LM head) and norms stay float, as bitsandbytes and GPTQ leave them:
  16  weights rounded to IEEE half (float16) and computed in float32;
  8/4 lmstack.quant.quantize_model, RTN, symmetric, groups of GROUP inputs: IntLinear codes
      and float16 scales (their stored bits per weight are read back from the modules);
  3   lmstack stores INT8 and INT4 only, so 3 bits is simulated: each weight is replaced by
      its value on the 3-bit RTN grid (rtn.fake_quantize, the values an INT3 format would
      hold); accuracy is exact, the memory saving is not realised.
Accuracy: next-token loss and top-1 accuracy on held-out windows, and the share of
positions whose top-1 token equals the float model's (agreement).
PTQ vs QAT: at 4 and 3 bits, QAT trains the float model through fake-quantized weights
(quant.qat.FakeQuantLinear, straight-through gradient) for STEPS steps, then rounds. The
control trains the float model the same steps at the same rate, then rounds (PTQ after the
same training): QAT's gain is what it beats that by, not what it beats the untrained PTQ by.
GGUF: the float model exported by lmstack.quant.export at f32 / f16 / q8_0 / q4_0; file
sizes, and (llama-cpp-python installed) llama.cpp's own loss on the same windows read from
each file.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import next_token_scores, tiny_lm, train, windows
from lmstack.model.replace import find_linears, replace_linears
from lmstack.quant import FakeQuantLinear, QuantConfig, convert_qat, prepare_qat, quantize_model
from lmstack.quant.rtn import fake_quantize

GROUP = 32
SEQ = 64
LOW_BITS = (4, 3)
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def _linears(model) -> list[torch.nn.Module]:
    return [model.get_submodule(t.name) for t in find_linears(model, "all-linear")]


@torch.no_grad()
def round_weights(model, bits: int):
    """`model` with its block linears at `bits` (see the module docstring), in place. Returns
    the stored bits per weight of those linears (None for the simulated 3 bits)."""
    if bits == 32:
        return 32.0
    if bits == 16:
        for lin in _linears(model):
            lin.weight.copy_(lin.weight.half().float())
        return 16.0
    if bits in (8, 4):
        quantize_model(model, QuantConfig(method="rtn", bits=bits, group_size=GROUP))
        mods = _linears(model)
        n = [m.out_features * m.in_features for m in mods]
        return float(sum(m.bits_per_param() * k for m, k in zip(mods, n)) / sum(n))
    for lin in _linears(model):
        lin.weight.copy_(fake_quantize(lin.weight, bits, GROUP, True))
    return None                         # not stored: see run(), which adds INT4's scale overhead


def fake_quant(model, bits: int) -> None:
    """Block linears -> FakeQuantLinear at `bits` (QAT's training-time module), in place."""
    if bits in (8, 4):
        prepare_qat(model, {"bits": bits, "group_size": GROUP})
    else:   # QuantConfig accepts the stored formats only; the fake-quantized module takes any grid
        replace_linears(model, find_linears(model, "all-linear"),
                        lambda lin, t: FakeQuantLinear(lin, bits, GROUP, True, t.name))


def _llama_cpp_scores(path, tokens: np.ndarray, n_rows: int) -> dict:
    """llama.cpp's next-token loss and top-1 accuracy on the first n_rows windows."""
    import llama_cpp
    # one thread each: ggml's spinning worker threads crawl on a shared machine; f32 K/V as the tests
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=SEQ + 1, n_threads=1, n_threads_batch=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    nll, hit, n = 0.0, 0, 0
    try:
        for x, y in zip(*windows(tokens, SEQ, n_rows)):            # the windows next_token_scores reads
            llm.reset()
            llm.eval(x.tolist())
            logits = torch.tensor(np.array(llm.scores[:SEQ]), dtype=torch.float64)
            nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            hit += int((logits.argmax(-1) == y).sum())
            n += SEQ
    finally:
        llm.close()
    return {"loss": nll / n, "acc": hit / n}


def run(ctx: LabContext) -> LabResult:
    lm, data = tiny_lm(ctx)
    base = lm.model
    val = data.tokens("val")
    n_rows = ctx.pick(16, 128)
    steps, lr = ctx.pick(25, 300), ctx.pick(2e-3, 1e-3)
    ref = next_token_scores(base, val, SEQ, n_rows)

    def score(model) -> dict:
        s = next_token_scores(model, val, SEQ, n_rows)
        return {"loss": s["loss"], "acc": s["acc"], "agreement": float((s["argmax"] == ref["argmax"]).mean()),
                "loss_increase": s["loss"] - ref["loss"]}

    ptq = {}
    for bits in (32, 16, 8, 4, 3):
        ctx.log(f"  PTQ {bits} bits")
        m = copy.deepcopy(base)
        bpp = round_weights(m, bits)
        ptq[str(bits)] = {**score(m), "bits_per_weight": bpp}
    ptq["3"]["bits_per_weight"] = 3 + ptq["4"]["bits_per_weight"] - 4      # codes + the scales INT4 stores

    tune = dict(steps=steps, data=data, seq_len=SEQ, batch_size=ctx.pick(8, 16), lr=lr)
    float_tuned = train(ctx, "float", copy.deepcopy(base), **tune).model
    qat = {}
    for bits in LOW_BITS:
        ctx.log(f"  QAT {bits} bits")
        m = copy.deepcopy(base)
        fake_quant(m, bits)
        r = train(ctx, f"qat{bits}", m, **tune)
        if bits in (8, 4):
            convert_qat(r.model)           # the stored IntLinear codes
        qat_scores = score(r.model)
        control = copy.deepcopy(float_tuned)
        round_weights(control, bits)
        ctl = score(control)
        qat[str(bits)] = {"qat": qat_scores, "ptq_same_training": ctl, "ptq": ptq[str(bits)],
                          "qat_gain": ctl["loss"] - qat_scores["loss"]}
    float_tuned_loss = score(float_tuned)["loss"]

    gguf_dir = ctx.work / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    from lmstack.quant.export import export_gguf
    gguf = {}
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
    cpp_rows = ctx.pick(4, 32)
    for kind in GGUF_TYPES:
        ctx.log(f"  GGUF {kind}")
        r = export_gguf(base, data.tokenizer, gguf_dir / f"tiny-{kind}.gguf", type=kind)
        gguf[kind] = {"bytes": r.nbytes, "fallbacks": len(r.fallbacks)}
        if have_llama:
            gguf[kind].update({f"llama_cpp_{k}": v for k, v in _llama_cpp_scores(r.path, val, cpp_rows).items()})
    ours_cpp_rows = next_token_scores(base, val, SEQ, cpp_rows)

    L = {b: ptq[b]["loss_increase"] for b in ptq}
    # "almost nothing": under 0.2% of the float loss; each halving of the bits below 8 costs more
    small = 0.002 * ref["loss"]
    holds = (abs(L["16"]) < small and abs(L["8"]) < small and L["3"] > L["4"] > max(L["8"], 0)
             and qat["3"]["qat_gain"] > 0)
    insight = Insight(
        "Rounding weights costs almost nothing at 16 and 8 bits and more with every bit below, and training "
        "through the rounding (QAT) wins back part of what rounding after the same training (PTQ) loses",
        holds, f"loss {L['16']:+.4f} at 16 bits, {L['8']:+.4f} at 8, {L['4']:+.4f} at 4, {L['3']:+.4f} at 3 over "
               f"{ref['loss']:.3f} (top-1 agreement with float {ptq['8']['agreement']:.1%}, "
               f"{ptq['4']['agreement']:.1%}, {ptq['3']['agreement']:.1%}); after {steps} more training steps, "
               f"3-bit QAT reaches {qat['3']['qat']['loss']:.3f} against {qat['3']['ptq_same_training']['loss']:.3f} "
               f"for float training then PTQ (QAT gain {qat['3']['qat_gain']:+.4f}; at 4 bits "
               f"{qat['4']['qat_gain']:+.4f})")
    numbers = {"group_size": GROUP, "seq_len": SEQ, "eval_windows": n_rows, "qat_steps": steps, "qat_lr": lr,
               "float": {"loss": ref["loss"], "acc": ref["acc"]}, "ptq": ptq, "qat": qat,
               "float_after_same_training": {"loss": float_tuned_loss}, "gguf": gguf,
               "gguf_llama_cpp": have_llama, "gguf_eval_windows": cpp_rows,
               "ours_on_gguf_windows": {"loss": ours_cpp_rows["loss"], "acc": ours_cpp_rows["acc"]}}
    figures = [Figure("accuracy_vs_bits", "Held-out loss and top-1 agreement with the float model against the "
                      "weights' bit width (PTQ, RTN groups of 32)", png=_bits_png(ptq)),
               Figure("ptq_vs_qat", "At 4 and 3 bits: PTQ, PTQ after the same float training, and QAT",
                      png=_qat_png(qat, ref["loss"])),
               Figure("gguf", "GGUF export: file size per type" + (" and llama.cpp's loss on the file"
                                                                  if have_llama else ""),
                      png=_gguf_png(gguf, ours_cpp_rows["loss"], have_llama))]
    built = [f"the tiny tinyworld LM ({base.num_params():,} parameters, val loss {ref['loss']:.3f}) with its "
             f"block linears rounded to 16, 8, 4 and 3 bits (RTN, groups of {GROUP}; 8 and 4 through "
             f"lmstack.quant.quantize_model, 3 simulated on the grid)",
             f"QAT at 4 and 3 bits: FakeQuantLinear through the Trainer for {steps} steps, then rounded "
             f"(convert_qat at 4); the control trains in float for the same steps and rounds afterwards",
             f"GGUF files ({', '.join(GGUF_TYPES)}) written by lmstack.quant.export.export_gguf"
             + (" and scored by llama.cpp (llama-cpp-python)" if have_llama else "")]
    notes = ["3-bit weights are simulated: the values are those of a 3-bit grid, the storage is not packed."]
    if not have_llama:
        notes.append("llama-cpp-python is not installed (pip install llama-cpp-python, or make llamacpp): the GGUF "
                     "files are written and sized but not run; with it the lab scores each file with llama.cpp.")
    return LabResult(built, numbers, figures, insight, notes)


def _bits_png(ptq: dict) -> bytes:
    bits = list(ptq)
    fig, ax = plot.subplots(width=7.0, height=4.0)
    ax.plot(bits, [ptq[b]["loss"] for b in bits], "o-", color=plot.COLORS[0], label="held-out loss")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("loss (nats/token)")
    ax2 = ax.twinx()
    ax2.plot(bits, [ptq[b]["agreement"] for b in bits], "s--", color=plot.COLORS[1], label="top-1 agreement")
    ax2.set_ylabel("top-1 agreement with float")
    ax.set_title("accuracy against bit width")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center left", fontsize=8)
    return plot.to_png(fig)


def _qat_png(qat: dict, float_loss: float) -> bytes:
    fig, ax = plot.subplots(width=7.0, height=4.0)
    kinds = [("ptq", "PTQ"), ("ptq_same_training", "float training, then PTQ"), ("qat", "QAT")]
    xs = np.arange(len(qat))
    for i, (k, label) in enumerate(kinds):
        vals = [qat[b][k]["loss"] for b in qat]
        ax.bar(xs + (i - 1) * 0.27, vals, 0.27, color=plot.COLORS[i], label=label)
    ax.axhline(float_loss, linestyle="--", color="#555", label="float")
    ax.set_xticks(xs, [f"{b} bits" for b in qat])
    ax.set_ylabel("held-out loss")
    lo = min(float_loss, *[qat[b][k]["loss"] for b in qat for k, _ in kinds])
    ax.set_ylim(lo * 0.97, None)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return plot.to_png(fig)


def _gguf_png(gguf: dict, ours: float, have_llama: bool) -> bytes:
    kinds = list(gguf)
    fig, axes = plot.subplots(ncols=2 if have_llama else 1, width=10.0 if have_llama else 5.5, height=3.6)
    axes = np.atleast_1d(axes)
    axes[0].bar(kinds, [gguf[k]["bytes"] / 1024 for k in kinds], color=plot.COLORS[: len(kinds)])
    axes[0].set_title("file size (KiB)")
    if have_llama:
        axes[1].bar(kinds, [gguf[k]["llama_cpp_loss"] for k in kinds], color=plot.COLORS[: len(kinds)])
        axes[1].axhline(ours, linestyle="--", color="#555", label="lmstack float")
        axes[1].set_ylim(ours * 0.97, None)
        axes[1].set_title("llama.cpp loss on the file")
        axes[1].legend(fontsize=8)
    return plot.to_png(fig)
