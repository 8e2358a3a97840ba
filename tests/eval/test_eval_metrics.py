"""Metrics on hand-computed cases: SQuAD normalization and F1, BLEU/ROUGE through their
reference packages, multiple-choice acc/acc_norm, perplexities."""
from __future__ import annotations

import math

import pytest

from lmstack.eval.metrics import (bleu, count_words, generation_scores, mc_scores, normalize_answer, perplexities,
                                  rouge, squad_em, token_f1)


@pytest.mark.parametrize("text,want", [
    ("The Cat!", "cat"), ("  an apple, a pear  ", "apple pear"), ("Theory of the mind.", "theory of mind"),
    ("A", ""), ("don't", "dont"), ("x\t\n y", "x y"),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_token_f1_and_squad_em_by_hand():
    # pred {big, red, dog}, ref {red, dog, barked}: 2 common -> P = R = 2/3 -> F1 = 2/3
    assert token_f1("the big red dog", "A red dog barked") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred [a1 a1 b], ref [a1 b b] -> common 2, F1 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("The Dog.", "dog") == 1.0 and token_f1("cat", "dog") == 0.0
    assert token_f1("the", "") == 1.0 and token_f1("", "dog") == 0.0      # both normalize to empty / one does
    assert squad_em("The  Paris!", "paris") == 1.0 and squad_em("Paris France", "Paris") == 0.0


def test_bleu_and_rouge_by_hand():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0, abs=1e-6)
    # ROUGE-1: pred "the cat sat", ref "the cat ran": 2 of 3 unigrams on each side -> F = 2/3
    # ROUGE-2: bigrams {the cat, cat sat} vs {the cat, cat ran}: 1 of 2 -> F = 1/2
    r = rouge(["the cat sat"], ["the cat ran"], ["rouge1", "rouge2", "rougeL"])
    assert r["rouge1"] == pytest.approx(2 / 3) and r["rouge2"] == pytest.approx(0.5)
    assert r["rougeL"] == pytest.approx(2 / 3)


def test_generation_scores_count_failures_as_zero():
    means, per = generation_scores(["4", None, " 7 "], ["4", "5", "7"], ["exact_match", "f1", "bleu"])
    assert means["exact_match"] == pytest.approx(2 / 3) and means["f1"] == pytest.approx(2 / 3)
    assert [p["exact_match"] for p in per] == [1.0, 0.0, 1.0]
    assert means["bleu"] == pytest.approx(bleu(["4", " 7 "], ["4", "7"]))   # failed example left out


def test_mc_scores_acc_vs_acc_norm():
    # raw: choice 1 (-4) beats choice 0 (-6); per character: -6/12 = -0.5 beats -4/2 = -2
    choices = ["twelve chars", "no"]
    assert mc_scores([-6.0, -4.0], choices, gold=0) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    # bytes differ from characters for non-ASCII: "éé" is 2 chars but 4 bytes
    s = mc_scores([-4.0, -3.9], ["éé", "ab"], gold=0)
    assert s["acc_norm"] == 0.0 and s["acc_bytes"] == 1.0
    assert mc_scores([-1.0, -1.0], ["a", "b"], gold=0)["acc"] == 1.0          # ties -> first, like numpy


def test_perplexities_by_hand():
    p = perplexities(-math.log(2) * 8, tokens=8, words=4, n_bytes=16)
    assert p["token_perplexity"] == pytest.approx(2.0) and p["word_perplexity"] == pytest.approx(4.0)
    assert p["byte_perplexity"] == pytest.approx(math.sqrt(2)) and p["bits_per_byte"] == pytest.approx(0.5)
    assert perplexities(0.0, 0, 0, 0)["token_perplexity"] is None           # nothing scored
    assert count_words("a  b\nc ") == 4          # lm-eval's re.split: the trailing space makes an empty piece
