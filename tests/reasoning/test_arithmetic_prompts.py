"""Problem prompts are byte-equal to tinyworld's, and the answer extractor reads tinyworld's own
worked solutions (the reference) to the right number."""
from __future__ import annotations

import random

import pytest

from lmstack.data import tinyworld_tasks as tasks
from lmstack.reasoning import Problem, extract_answer, majority_vote
from lmstack.utils import LmstackError


def _records(steps: bool, n: int = 60) -> list[dict]:
    rng = random.Random(1)
    return [tasks.arithmetic(rng, lambda key: True, steps=steps) for _ in range(n)]


def test_direct_prompt_matches_tinyworld_and_extracts_its_answer():
    for rec in _records(steps=False):
        p = Problem.parse(rec["prompt"])
        assert p.prompt("direct") == rec["prompt"]
        assert p.answer == rec["answer"]
        assert extract_answer(rec["prompt"], rec["response"]) == rec["answer"]
        assert extract_answer(rec["prompt"], rec["rejected"]) != rec["answer"]


def test_cot_prompt_matches_tinyworld_and_extracts_the_final_number_of_worked_steps():
    for rec in _records(steps=True):
        p = Problem.parse(rec["prompt"])
        assert p.prompt("cot") == rec["prompt"]
        # the steps contain many '=n'; only the last one is the answer
        assert extract_answer(rec["prompt"], rec["response"] + "\nQ: next") == p.answer
        assert extract_answer(rec["prompt"], rec["rejected"]) != p.answer


def test_tool_trace_and_extraction():
    p = Problem(47, "+", 38)
    assert p.tool_trace() == "Q: what is 47+38? use the calculator.\nA: <calc>47+38</calc>=85"
    prompt = p.prompt("tool")
    assert extract_answer(prompt, p.tool_trace()[len(prompt):]) == "85"
    assert Problem(9, "-", 12).answer == "-3" and extract_answer("A:", " so 9-12=-3") == "-3"


def test_extract_answer_refuses_cut_or_rambling_lines():
    prompt = Problem(47, "+", 38).prompt("cot")
    assert extract_answer(prompt, " 7+8=15, write 5 carry 1. 4+3+1=8", complete=False) is None
    assert extract_answer(prompt, " 7+8=15, write 5 carry 1. so 47+38=85\n", complete=False) == "85"
    assert extract_answer(prompt, " i do not know") is None
    assert extract_answer(prompt, " so 47+38=85, write") is None     # the line does not end in the number


def test_parse_rejects_non_arithmetic():
    with pytest.raises(LmstackError, match="not an arithmetic prompt"):
        Problem.parse("Q: where does Bolo live?")
    with pytest.raises(LmstackError, match="unknown style"):
        Problem(1, "+", 2).prompt("shout")


@pytest.mark.parametrize("votes, want", [
    (["3", "5", "3", None], "3"),
    (["5", "3", "3", "5"], "5"),           # tie: the answer seen first
    ([None, "7", None, None], "7"),        # None never wins
    ([None, None], None), ([], None),
])
def test_majority_vote(votes, want):
    assert majority_vote(votes) == want
