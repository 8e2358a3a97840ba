"""LLM-as-judge bookkeeping with scripted judges (a fair one, a position-biased one, a mix:
every count by hand), verdict parsing, calibration against exact-match labels, and one real
tiny-model judge whose verdicts equal direct log-likelihood calls."""
from __future__ import annotations

import re

import pytest

from lmstack.eval import Failure, Judge, LocalModel, compare, grade, load_judge_template, loglikelihood
from lmstack.eval.judge import binary_agreement
from lmstack.utils import LmstackError
from tests.eval.conftest import tiny_llm

PAIRWISE = load_judge_template("pairwise")
SINGLE = load_judge_template("single")

# (answer_a, answer_b, reference): which one is right decides the fair judge
ITEMS = [{"question": f"q{i}", "answer_a": a, "answer_b": b, "reference": ref,
          "label_a": int(a == ref), "label_b": int(b == ref)}
         for i, (a, b, ref) in enumerate([("4", "5", "4"), ("7", "6", "6"), ("x", "y", "z"), ("9", "8", "9"),
                                          ("1", "1", "1"), ("3", "2", "2")])]


def shown(prompt: str) -> tuple[str, str, str]:
    """(answer in position A, answer in position B, reference) as the template renders them."""
    get = lambda label: re.search(rf"{label} (.*)", prompt).group(1)   # noqa: E731
    return get(r"\[Answer A\]"), get(r"\[Answer B\]"), get("Reference answer:")


def fair(prompts):
    """Prefers the answer equal to the reference, wherever it is shown; a tie otherwise."""
    out = []
    for p in prompts:
        a, b, ref = shown(p)
        out.append("A" if a == ref and b != ref else "B" if b == ref and a != ref else "C")
    return out


def biased(prompts):
    return ["A"] * len(prompts)


def test_fair_judge_is_consistent_and_calibrated():
    r = compare(fair, ITEMS, PAIRWISE)
    assert [v["verdict"] for v in r["verdicts"]] == ["a", "b", "tie", "a", "tie", "b"]
    assert (r["wins_a"], r["wins_b"], r["ties"], r["inconsistent"]) == (2, 2, 2, 0)
    assert r["consistency_rate"] == 1.0 and r["win_rate_a"] == pytest.approx((2 + 1) / 6)
    # items 0, 1, 3, 5 have exactly one right answer; the fair judge picks it every time
    assert r["calibration"] == {"pairs_one_right": 4, "consistent_verdicts": 4, "picked_the_right_one": 4,
                                "agreement": 1.0}


def test_position_biased_judge_never_counts():
    r = compare(biased, ITEMS, PAIRWISE)
    # "A" in both orders means a different answer won each time: no verdict survives
    assert (r["wins_a"], r["wins_b"], r["ties"], r["inconsistent"]) == (0, 0, 0, 6)
    assert r["consistency_rate"] == 0.0 and r["win_rate_a"] is None
    assert r["calibration"]["consistent_verdicts"] == 0 and r["calibration"]["agreement"] is None


def test_half_biased_judge_by_hand():
    calls = []

    def mixed(prompts):        # fair on items 0-2, biased on items 3-5 (two prompts per item)
        calls.append(len(prompts))
        return [v if k // 2 < 3 else "A" for k, v in enumerate(fair(prompts))]
    r = compare(mixed, ITEMS, PAIRWISE)
    assert calls == [12]                                     # one batch: every item in both orders
    assert [v["verdict"] for v in r["verdicts"]] == ["a", "b", "tie", "inconsistent", "inconsistent", "inconsistent"]
    assert r["consistency_rate"] == pytest.approx(0.5) and r["win_rate_a"] == pytest.approx(1.5 / 3)
    assert r["calibration"]["pairs_one_right"] == 4 and r["calibration"]["consistent_verdicts"] == 2


def test_unparseable_verdicts_and_broken_items_are_listed():
    class Backend:
        def info(self):
            return {}

        def generate(self, prompts, max_tokens, stop=None, chat=False):
            texts = ["The better one is [[A]].", "hmm, [[D]]?", "[[B]]", Failure("HTTP 503")]
            return (texts * 3)[:len(prompts)]
    judge = Judge(Backend(), PAIRWISE, mode="generate")
    items = ITEMS[:2] + [{"question": "q", "answer_a": "1"}]            # the last has no answer_b
    r = compare(judge, items)
    assert r["n"] == 3 and r["n_judged"] == 0 and r["n_failed"] == 3
    assert "no verdict matching" in r["failures"][1]["reason"] and "hmm, [[D]]?" in r["failures"][1]["reason"]
    assert "HTTP 503" in r["failures"][2]["reason"]
    assert "cannot build the judge prompt" in r["failures"][0]["reason"]


def test_single_grading_calibration_by_hand():
    answers = [("4", "4", 1), ("5", "4", 0), ("six", "6", 0), ("7", "7", 1), ("8", "9", 0)]
    items = [{"question": "q", "answer": a, "reference": ref, "label": lab} for a, ref, lab in answers]

    def lenient(prompts):     # passes exact answers and also "six" (a wrong pass), fails the rest
        out = []
        for p in prompts:
            a = re.search("Answer to grade: (.*)", p).group(1)
            ref = re.search("Reference answer: (.*)", p).group(1)
            out.append("yes" if a == ref or a == "six" else "no")
        return out
    r = grade(lenient, items, SINGLE)
    assert [v["passed"] for v in r["verdicts"]] == [True, False, True, True, False]
    assert r["pass_rate"] == pytest.approx(3 / 5) and r["mean_score"] == pytest.approx(3 / 5)
    cal = r["calibration"]
    assert (cal["judge_pass_label_right"], cal["judge_fail_label_wrong"], cal["judge_pass_label_wrong"],
            cal["judge_fail_label_right"]) == (2, 2, 1, 0)
    # agreement 4/5; chance = (3*2 + 2*3) / 25 = 12/25; kappa = (0.8 - 0.48) / 0.52
    assert cal["agreement"] == pytest.approx(0.8) and cal["kappa"] == pytest.approx(0.32 / 0.52)
    assert binary_agreement([True, False], [True, False])["kappa"] == 1.0
    with pytest.raises(LmstackError, match="is for pairwise judging, not single"):
        grade(lenient, items, PAIRWISE)


def test_real_tiny_model_judge(tokenizer):
    llm = tiny_llm(tokenizer, seed=5, context_length=256)
    judge = Judge(LocalModel(llm), PAIRWISE, mode="loglikelihood")
    items = ITEMS[:4]
    r = compare(judge, items)
    # the reference: each verdict's text scored directly, in both orders
    names = list(PAIRWISE.verdicts)
    expected = []
    for it in items:
        picks = []
        for a, b in ((it["answer_a"], it["answer_b"]), (it["answer_b"], it["answer_a"])):
            prompt = PAIRWISE.prompt.format(rubric=PAIRWISE.rubric, question=it["question"], reference=it["reference"],
                                            answer_a=a, answer_b=b)
            lls = [x for x, _ in loglikelihood(llm, [(prompt, PAIRWISE.verdicts[v]) for v in names])]
            picks.append(names[lls.index(max(lls))])
        expected.append(picks)
    assert [(v["first_order"], v["swapped_order"]) for v in r["verdicts"]] == [tuple(p) for p in expected]
    agree = sum(v["verdict"] != "inconsistent" for v in r["verdicts"])
    assert r["consistency_rate"] == pytest.approx(agree / 4) and r["n_failed"] == 0
    # generate mode on the same random model: every item is either judged or a listed failure
    g = grade(Judge(LocalModel(llm), SINGLE, mode="generate", max_tokens=8),
              [{"question": "q", "answer": "4", "reference": "4", "label": 1}] * 3)
    assert g["n_judged"] + g["n_failed"] == 3
    assert all("no verdict matching" in f["reason"] for f in g["failures"])
