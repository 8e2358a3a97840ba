"""The tool loop and the strategies on the real engine, with a scripted model whose every
output is known: the byte at position p+1 of a script. A tool result written into the
context moves the model along its script, so the test can tell the tool's number from the
model's own (the script says 9 where the tool says 5)."""
from __future__ import annotations

import pytest

from lmstack.infer import LLM, SamplingParams
from lmstack.reasoning import Problem, generate_with_tools, solve
from tests.infer.conftest import ByteTokenizer, ScriptedModel

TOOL_PROMPT = "Q: what is 2+3? use the calculator.\nA:"


def scripted_llm(script: str, context_length: int = 128) -> LLM:
    data = list(script.encode())
    return LLM(ScriptedModel(data, context_length=context_length), ByteTokenizer(), block_size=8,
               kv_cache_tokens=1024, device="cpu")


GREEDY = SamplingParams(temperature=0, max_tokens=40, stop=["\n"])


def test_result_is_the_tools_not_the_models():
    llm = scripted_llm(TOOL_PROMPT + " <calc>2+3</calc>=9 ok\n")
    run = generate_with_tools(llm, [TOOL_PROMPT], GREEDY)[0]
    assert run.text == " <calc>2+3</calc>=5 ok"          # '=5' from the tool; the script says 9
    assert [(c.expression, c.value) for c in run.calls] == [("2+3", 5)]
    assert run.rounds == 2 and run.finish_reason == "stop" and run.error is None
    # model tokens only: ' <calc>2+3' + '</calc>' (stop string) in round 1, ' ok' + '\n' in round 2
    assert run.generated_tokens == len(" <calc>2+3</calc>") + len(" ok\n")


def test_without_calls_the_model_writes_its_own_number():
    llm = scripted_llm(TOOL_PROMPT + " <calc>2+3</calc>=9 ok\n")
    run = generate_with_tools(llm, [TOOL_PROMPT], GREEDY, max_calls=0)[0]
    assert run.text == " <calc>2+3</calc>=9 ok" and run.calls == [] and run.rounds == 1


@pytest.mark.parametrize("expr, shown", [("1/0", "error: division by zero"),
                                         ("2+", "error: malformed expression '2+'")])
def test_a_failing_call_is_recorded_and_the_model_sees_the_error(expr, shown):
    prompt = "A:"
    llm = scripted_llm(f"{prompt} <calc>{expr}</calc>={shown}. sorry\n")
    run = generate_with_tools(llm, [prompt], GREEDY)[0]
    assert run.text == f" <calc>{expr}</calc>={shown}. sorry"
    assert run.calls[0].value is None and f"error: {run.calls[0].error}" == shown
    assert run.error is None and run.finish_reason == "stop"


def test_a_prompt_too_long_fails_alone():
    llm = scripted_llm("A: <calc>2+3</calc>=9 ok\n", context_length=64)
    runs = generate_with_tools(llm, ["x" * 100, "A:"], GREEDY)
    assert runs[0].error is not None and "context" in runs[0].error and runs[0].finish_reason == "error"
    assert runs[1].error is None and runs[1].calls and runs[1].calls[0].value == 5


def test_token_budget_is_shared_by_all_rounds():
    llm = scripted_llm(TOOL_PROMPT + " <calc>2+3</calc>=9 ok and more words\n")
    budget = len(" <calc>2+3</calc>") + 2
    run = generate_with_tools(llm, [TOOL_PROMPT], SamplingParams(temperature=0, max_tokens=budget, stop=["\n"]))[0]
    assert run.generated_tokens == budget and run.finish_reason == "length" and not run.complete


def test_strategies_count_answers_and_tokens():
    # direct: 'A: 2+3=' -> '5' then '\n' (2 tokens)
    llm = scripted_llm("Q: what is 2+3?\nA: 2+3=5\n")
    p = Problem(2, "+", 3)
    direct = solve(llm, [p], "direct")
    assert direct.attempts[0].prediction == "5" and direct.summary()["accuracy"] == 1.0
    assert direct.summary()["tokens_per_question"] == 2
    # self-consistency: k samples of the same (scripted) solution, k times the tokens; the
    # script's prompt is the cot one so the samples say ' so 2+3=5'
    llm = scripted_llm("Q: what is 2+3? show your work.\nA: so 2+3=5\n")
    sc = solve(llm, [p], "self_consistency", k=4, temperature=0.7)
    a = sc.attempts[0]
    assert a.votes == ["5"] * 4 and a.prediction == "5" and a.generated_tokens == 4 * len(" so 2+3=5\n")
    assert sc.summary()["k"] == 4
    # tool: the calculator's answer counts even though the script's number is wrong
    llm = scripted_llm(TOOL_PROMPT + " <calc>2+3</calc>=9\n")
    tool = solve(llm, [p], "tool")
    assert tool.attempts[0].prediction == "5" and tool.attempts[0].correct


def test_strategies_record_a_too_long_prompt_and_go_on():
    llm = scripted_llm("Q: what is 2+3?\nA: 2+3=5\n", context_length=32)
    res = solve(llm, [Problem(2, "+", 3), Problem(123456789, "*", 987654321)], "direct")
    assert res.attempts[0].correct
    assert "context" in res.attempts[1].error and res.attempts[1].prediction is None
    assert res.summary()["failed"] == 1 and res.summary()["accuracy"] == 0.5
