r"""Metrics of the task harness: what one example scores, and how a task aggregates them.

Generation (a prediction string against a reference string):
    exact_match   the (extracted) prediction's first line, whitespace-stripped, equals the
                  reference (probes.exact_match: the tinyworld rule)
    squad_em      equal after SQuAD's normalization (lowercase, drop punctuation and the
                  articles a/an/the, collapse whitespace)
    f1            SQuAD's token F1 on normalized tokens (bag-of-words overlap; an empty
                  side scores 1 if both are empty, else 0, as SQuAD v2's script)
    bleu          corpus BLEU through sacrebleu (0-100, over the task's examples)
    rouge1/2/L    mean ROUGE F-measure through rouge-score (0-1)
Multiple choice (log-likelihood of each choice as a continuation):
    acc           argmax of the log-likelihoods is the gold choice
    acc_norm      argmax of log-likelihood / len(choice) in characters (lm-eval's acc_norm;
                  the choice string without the delimiter before it)
    acc_bytes     the same divided by len(choice) in UTF-8 bytes (lm-eval's acc_bytes)
Perplexity (a document's summed log-likelihood, lm-eval's rolling windows):
    token_perplexity  exp(-sum logprob / tokens)      word_perplexity  per word (lm-eval's
    byte_perplexity   per UTF-8 byte                  count_words: re.split(r"\s+", text))
    bits_per_byte     -sum logprob / bytes / ln 2
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

from lmstack.data.probes import exact_match
from lmstack.utils import LmstackError

GENERATION_METRICS = ("exact_match", "squad_em", "f1", "bleu", "rouge1", "rouge2", "rougeL")
MC_METRICS = ("acc", "acc_norm", "acc_bytes")
PPL_METRICS = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


# ------------------------------------------------------------------ generation
def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalize_answer: lowercase, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_em(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over normalized whitespace tokens (two empty strings score 1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exp smoothing), 0-100."""
    try:
        import sacrebleu
    except ImportError:
        raise LmstackError("the bleu metric needs sacrebleu: pip install 'lmstack[eval]'") from None
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measure per type (rouge-score, Porter stemming off, as its default)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise LmstackError("the rouge metrics need rouge-score: pip install 'lmstack[eval]'") from None
    scorer = rouge_scorer.RougeScorer(list(types))
    totals = dict.fromkeys(types, 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)                       # (target, prediction)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: v / n for t, v in totals.items()}


PER_EXAMPLE = {"exact_match": lambda p, r: float(exact_match(p, r)), "squad_em": squad_em, "f1": token_f1}


def generation_scores(predictions: Sequence[str | None], references: Sequence[str],
                      metrics: Sequence[str], raw: Sequence[str | None] | None = None,
                      raw_references: Sequence[str] | None = None) -> tuple[dict[str, float], list[dict]]:
    """(task means, per-example scores). A None prediction (a failed example) scores 0 on
    the per-example metrics and is left out of BLEU/ROUGE, which need text. `raw` /
    `raw_references` (before answer extraction) feed BLEU and ROUGE when given."""
    raw = raw if raw is not None else predictions
    raw_references = raw_references if raw_references is not None else references
    per = [dict() for _ in predictions]
    means: dict[str, float] = {}
    for m in metrics:
        if m in PER_EXAMPLE:
            values = [PER_EXAMPLE[m](p, r) if p is not None else 0.0 for p, r in zip(predictions, references)]
            for row, v in zip(per, values):
                row[m] = v
            means[m] = sum(values) / len(values) if values else 0.0
    ok = [i for i, p in enumerate(raw) if p is not None]
    texts, refs = [raw[i] for i in ok], [raw_references[i] for i in ok]
    if "bleu" in metrics:
        means["bleu"] = bleu(texts, refs)
    wanted = [m for m in metrics if m.startswith("rouge")]
    if wanted:
        means.update(rouge(texts, refs, wanted))
    return means, per


# ------------------------------------------------------------------ multiple choice
def mc_scores(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm, acc_bytes of one question (argmax ties go to the first choice, as
    numpy's argmax in lm-eval)."""
    def argmax(values):
        return max(range(len(values)), key=lambda i: (values[i], -i))
    by_chars = [ll / max(len(c), 1) for ll, c in zip(loglikelihoods, choices)]
    by_bytes = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(loglikelihoods, choices)]
    return {"acc": float(argmax(loglikelihoods) == gold), "acc_norm": float(argmax(by_chars) == gold),
            "acc_bytes": float(argmax(by_bytes) == gold)}


# ------------------------------------------------------------------ perplexity
def count_words(text: str) -> int:
    """lm-eval's word count for word_perplexity (pieces between runs of whitespace)."""
    return len(re.split(r"\s+", text))


def perplexities(logprob_sum: float, tokens: int, words: int, n_bytes: int) -> dict[str, float | None]:
    """The aggregate perplexities of documents whose log-likelihoods sum to `logprob_sum`
    (lm-eval's weighted_perplexity: exp of the total over the total count); None when
    nothing was scored (JSON has no NaN)."""
    def ppl(count):
        return math.exp(-logprob_sum / count) if count else None
    return {"token_perplexity": ppl(tokens), "word_perplexity": ppl(words), "byte_perplexity": ppl(n_bytes),
            "bits_per_byte": -logprob_sum / n_bytes / math.log(2) if n_bytes else None}
