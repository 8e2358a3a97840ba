"""Lab 1: tokenization. BPE from scratch, a token visualizer, one-hot vs learned embeddings,
and bytes per token by script.

  - Two byte-level BPE tokenizers (lmstack.tokenizer) trained on the same tinyworld text,
    one with GPT-2's pre-tokenization split, one with the cl100k ("gpt4") split; the second
    is run through tiktoken's engine (its ids checked equal to our Python encoder's).
    cl100k_base itself is a download, which a lab never makes, so "cl100k" here means the
    cl100k split pattern with merges learned from our text: the comparison is of the split,
    not of OpenAI's vocabulary.
  - Bytes per token by script on a multi-script sample (Latin, CJK, code, emoji) plus unseen
    tinyworld text, with the
    visualizer's script labels (tokenizer/viz.py), and the coloured token spans as a page.
  - One-hot vs learned: one-hot ids are all orthogonal (cosine 0 between any two tokens);
    the tiny LM's trained embedding table places tokens used alike near each other. Compared
    on the ten digit tokens against common word tokens, trained and at initialisation.
"""
from __future__ import annotations

import numpy as np
import torch

from lmstack.labs import plot
from lmstack.labs.base import Figure, Insight, LabContext, LabResult
from lmstack.labs.toy import build_model, tiny_lm
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer import viz

SCRIPTS = ("latin", "cjk", "code", "emoji")


def bytes_per_token(tok: Tokenizer, text: str) -> dict[str, float]:
    rows = {r["script"]: r["bytes_per_token"] for r in viz.script_stats(tok, text)}
    return {s: float(rows[s]) for s in (*SCRIPTS, "all") if s in rows}


def cosine_matrix(emb: torch.Tensor) -> np.ndarray:
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    return (e @ e.T).numpy()


def group_cosines(cos: np.ndarray, n_a: int) -> tuple[float, float]:
    """(mean cosine within the first n_a rows' group, mean cosine between that group and the rest)."""
    within = cos[:n_a, :n_a][~np.eye(n_a, dtype=bool)].mean()
    return float(within), float(cos[:n_a, n_a:].mean())


def run(ctx: LabContext) -> LabResult:
    lm, data = tiny_lm(ctx)
    texts = _train_texts(data, "train")[: ctx.pick(1500, 20000)]
    # the sample: the visualizer's multi-script text plus unseen in-domain English (tinyworld's val split)
    sample = viz.SAMPLE_TEXT + "\n".join(_train_texts(data, "val")[:6]) + "\n"
    vocab = ctx.pick(1024, 4096)
    ours = Tokenizer.train(texts, vocab_size=vocab, pattern="gpt2", show_progress=False).set_backend("python")
    cl100k = Tokenizer.train(texts, vocab_size=vocab, pattern="gpt4", show_progress=False)
    python_ids = cl100k.set_backend("python").encode(sample, allowed_special="all")
    cl100k.set_backend("tiktoken")
    tiktoken_ids = cl100k.encode(sample, allowed_special="all")
    bpt = {"gpt2 split": bytes_per_token(ours, sample),
           "cl100k split (tiktoken)": bytes_per_token(cl100k, sample)}
    first_merges = [cl100k.decode([256 + i]) for i in range(12)]

    # one-hot vs learned: digits against the most frequent word tokens
    tok = data.tokenizer
    digits = [tok.encode(str(d))[0] for d in range(10)]
    counts = np.bincount(data.tokens("train"), minlength=tok.n_vocab)
    words = [i for i in np.argsort(-counts).tolist()
             if tok.decode([i]).strip().isalpha() and len(tok.decode([i]).strip()) > 2][:10]
    ids = digits + words
    labels = [tok.decode([i]) for i in ids]
    trained = lm.model.wte.weight.detach()[ids]
    init = build_model(lm.model.config, ctx.seed + 1).wte.weight.detach()[ids]
    cos = {"one-hot": np.eye(len(ids)), "learned, at init": cosine_matrix(init),
           "learned, trained": cosine_matrix(trained)}
    groups = {k: dict(zip(("within_digits", "digits_vs_words"), group_cosines(v, len(digits)))) for k, v in cos.items()}

    cl, tr = bpt["cl100k split (tiktoken)"], groups["learned, trained"]
    unseen = max(cl.get("cjk", 0.0), cl.get("emoji", 0.0))
    gap_trained = tr["within_digits"] - tr["digits_vs_words"]
    gap_init = groups["learned, at init"]["within_digits"] - groups["learned, at init"]["digits_vs_words"]
    holds = cl["latin"] > 2 * unseen and gap_trained > gap_init + 0.1 and python_ids == tiktoken_ids
    insight = Insight(
        "BPE packs the script it was trained on into long tokens and falls back to bytes elsewhere, and training "
        "turns orthogonal ids into embeddings where tokens used alike sit together",
        holds, f"{cl['latin']:.2f} bytes per token on Latin text against {cl.get('cjk', 0):.2f} on CJK and "
               f"{cl.get('emoji', 0):.2f} on emoji (cl100k split, trained on English tinyworld); digit embeddings "
               f"have mean cosine {tr['within_digits']:.2f} with each other and {tr['digits_vs_words']:.2f} with "
               f"words after training, against {gap_init:+.2f} apart at init and exactly 0 for one-hot")
    numbers = {"vocab_size": vocab, "training_texts": len(texts), "first_merges": first_merges,
               "bytes_per_token": bpt, "tiktoken_equals_python": python_ids == tiktoken_ids,
               "sample_tokens": {"gpt2 split": len(ours.encode(sample, allowed_special="all")),
                                 "cl100k split": len(tiktoken_ids)},
               "embedding_cosines": groups, "embedding_dim": {"one-hot": tok.n_vocab, "learned": trained.shape[1]}}
    spans = viz.token_spans(cl100k, tiktoken_ids)
    page = viz.render_html(spans, viz.script_stats(cl100k, sample),
                           f"{len(tiktoken_ids)} tokens: cl100k split, {vocab}-token BPE trained on tinyworld")
    figures = [
        Figure("bytes_per_token", "Bytes per token by script: more is better packing; 1 is raw bytes",
               png=_bpt_png(bpt)),
        Figure("tokens", "The token visualizer: each coloured span is one token (hover for its id)", html=page),
        Figure("embedding_cosine", "Cosine distance (1 - cos) between token embeddings: one-hot, learned at init, "
               "learned after training (digits first, then frequent words)", png=_cos_png(cos, labels)),
        Figure("embedding_map", "Trained token embeddings projected on their top two principal directions",
               png=_map_png(trained, labels, len(digits))),
    ]
    built = [f"two {vocab}-token byte-level BPE tokenizers trained from scratch on {len(texts)} tinyworld documents: "
             f"GPT-2 split and cl100k split", "the cl100k-split tokenizer exported to tiktoken ranks and run by "
             "tiktoken, checked id for id against the Python encoder",
             "bytes-per-token statistics by script on a Latin/CJK/code/emoji sample",
             "cosine distances of one-hot, initial and trained embeddings of the tiny tinyworld LM"]
    notes = ["tiktoken's cl100k_base vocabulary needs a download, which labs never make: the comparison uses our "
             "BPE with the cl100k split pattern, trained on the same text, encoded by tiktoken."]
    return LabResult(built, numbers, figures, insight, notes)


def _train_texts(data, split: str) -> list[str]:
    from lmstack.data import iter_texts
    return list(iter_texts(data.dir, split))


def _bpt_png(bpt: dict[str, dict[str, float]]) -> bytes:
    fig, ax = plot.subplots(width=7.0, height=3.8)
    names = list(bpt)
    scripts = [s for s in (*SCRIPTS, "all") if all(s in bpt[n] for n in names)]
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * w for k in range(len(scripts))]
        ax.bar(xs, [bpt[n][s] for s in scripts], w, label=n, color=plot.COLORS[i])
        for x, s in zip(xs, scripts):
            ax.text(x, bpt[n][s], f"{bpt[n][s]:.1f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, linestyle="--", color="#777", label="raw bytes")
    ax.set_xticks(range(len(scripts)), scripts)
    ax.set_ylabel("bytes per token")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return plot.to_png(fig)


def _cos_png(cos: dict[str, np.ndarray], labels: list[str]) -> bytes:
    fig, axes = plot.subplots(ncols=len(cos), width=5.0 * len(cos), height=4.6, layout="constrained")
    for ax, (name, m) in zip(axes, cos.items()):
        im = ax.imshow(1 - m, cmap="magma", vmin=0, vmax=2)
        ax.set_title(name)
        ax.set_xticks(range(len(labels)), [repr(s)[1:-1] for s in labels], rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), [repr(s)[1:-1] for s in labels], fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.7, label="cosine distance")
    return plot.to_png(fig)


def _map_png(emb: torch.Tensor, labels: list[str], n_digits: int) -> bytes:
    e = emb.float() - emb.float().mean(0)
    xy = (e @ torch.linalg.svd(e, full_matrices=False)[2][:2].T).numpy()
    fig, ax = plot.subplots(width=6.0, height=4.6)
    ax.scatter(xy[:n_digits, 0], xy[:n_digits, 1], color=plot.COLORS[0], label="digits")
    ax.scatter(xy[n_digits:, 0], xy[n_digits:, 1], color=plot.COLORS[1], label="words")
    for (x, y), s in zip(xy, labels):
        ax.annotate(repr(s)[1:-1], (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=8)
    ax.set_title("trained embeddings, PCA")
    return plot.to_png(fig)
