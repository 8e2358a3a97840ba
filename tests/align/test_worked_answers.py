"""GRPO on worked arithmetic: the final_answer reward reads the conclusion of a worked solution,
tinyworld's arithmetic_steps prompts carry the final number as their answer (checked against
Python's arithmetic on the parsed problem), and held-out exact match scores with that rule."""
import random
import re

import pytest

from lmstack.align import data as D
from lmstack.align.config import AlignConfig
from lmstack.align.evaluate import exact_match
from lmstack.align.rewards import final_answer, resolve_reward
from lmstack.align.rollout import Rollout
from lmstack.data import tinyworld_tasks as tw

_PROBLEM = re.compile(r"what is (\d+)([-+*])(\d+)\? show your work\.\nA:$")


def _truth(prompt: str) -> int:
    a, op, b = _PROBLEM.search(prompt).groups()
    a, b = int(a), int(b)
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_final_answer_reads_the_conclusion_of_tinyworlds_worked_steps():
    rng = random.Random(0)
    for _ in range(200):
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-*")
        if op == "-" and a < b:
            a, b = b, a
        work = tw._STEPS[op](a, b)
        right = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert final_answer("", " " + work, str(right)) == 1.0
        assert final_answer("", " " + work + "\nQ: what is 1+1?", str(right)) == 1.0    # first line only
        assert final_answer("", " " + work, str(right + 1)) == 0.0
        assert final_answer("", " " + work + "0", str(right)) == 0.0                      # a longer number
        cut = work[:max(work.rfind(" so "), 0)]                                         # budget ran out
        assert final_answer("", " " + cut, str(right)) == 0.0
    # an intermediate step that happens to equal the answer is not the conclusion
    assert final_answer("", " 4+3+1=8, write 8", "8") == 0.0
    assert resolve_reward("final_answer") is final_answer


def test_arithmetic_steps_prompts_answer_with_the_final_number_and_hold_out_by_problem():
    train = D.tinyworld_prompts(seed=0, n=300, tasks=("arithmetic_steps",))
    held = D.tinyworld_prompts(seed=0, n=300, heldout=True, tasks=("arithmetic_steps",))
    for r in train + held:
        assert r["task"] == "arithmetic_steps"
        assert r["answer"] == str(_truth(r["prompt"]))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    # direct prompts keep the plain answer line
    direct = D.tinyworld_prompts(seed=0, n=20, tasks=("arithmetic",))
    assert all(r["prompt"].endswith("=") and r["answer"].lstrip("-").isdigit() for r in direct)


class FixedCompletions:
    def __init__(self, texts):
        self.texts = texts

    def sample(self, prompt_ids, n, seed, greedy=False):
        return [[Rollout(p, [1], [], t, "stop")] for p, t in zip(prompt_ids, self.texts)]


def test_held_out_exact_match_scores_worked_solutions_with_the_final_answer_rule():
    recs = [{"prompt": "q", "answer": a} for a in ("85", "7", "12")]
    texts = [" 7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 47+38=85", " so 3+4=8", " 2+1=3, write 12"]
    assert exact_match(FixedCompletions(texts), recs, [[0]] * 3, score=final_answer)["exact_match"] == \
        pytest.approx(1 / 3)
    assert exact_match(FixedCompletions(texts), recs, [[0]] * 3)["exact_match"] == 0.0   # first-line rule
    # the run's rule follows its rewards unless given
    assert AlignConfig(method="grpo", model="m", rewards=["final_answer"]).eval_reward == "final_answer"
    assert AlignConfig(method="grpo", model="m").eval_reward == "exact_answer"
