"""tool_calls_from_text: raw model output -> OpenAI tool_calls, checked against hand-written
expected messages in OpenAI's shape."""
from __future__ import annotations

import json

import pytest

from lmstack.reasoning import CALCULATOR_TOOL, chat_message, tool_calls_from_text

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_calc_tag_becomes_an_openai_tool_call():
    content, calls = tool_calls_from_text("let me compute. <calc>47+38</calc>", [CALCULATOR_TOOL])
    assert content == "let me compute."
    assert calls == [{"id": "call_0", "type": "function",
                      "function": {"name": "calculator", "arguments": '{"expression": "47+38"}'}}]
    assert json.loads(calls[0]["function"]["arguments"]) == {"expression": "47+38"}


def test_hermes_tool_call_and_several_calls_in_order():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Tinar"}}</tool_call> and '
            '<calc> 2*3 </calc>')
    content, calls = tool_calls_from_text(text, [CALCULATOR_TOOL, WEATHER])
    assert content == "and"
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("call_0", "get_weather", {"city": "Tinar"}), ("call_1", "calculator", {"expression": "2*3"})]


def test_only_calls_means_null_content():
    assert tool_calls_from_text("<calc>1+1</calc>", [CALCULATOR_TOOL])[0] is None


@pytest.mark.parametrize("text, tools", [
    ("<calc>1+1</calc>", None),                                             # no tools declared
    ("<calc>1+1</calc>", [WEATHER]),                                        # calculator not declared
    ('<tool_call>{"name": "send_mail", "arguments": {}}</tool_call>', [WEATHER]),   # undeclared tool
    ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', [WEATHER]),  # bad JSON
    ('<tool_call>{"name": "get_weather", "arguments": "Tinar"}</tool_call>', [WEATHER]),  # args not an object
    ("<calc>1+1", [CALCULATOR_TOOL]),                                       # unterminated
    ("plain answer", [CALCULATOR_TOOL]),
])
def test_anything_but_a_valid_declared_call_stays_content(text, tools):
    assert tool_calls_from_text(text, tools) == (text, [])


def test_chat_message_sets_finish_reason_tool_calls():
    msg, finish = chat_message("<calc>6*7</calc>", [CALCULATOR_TOOL], "stop")
    assert finish == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"]["name"] == "calculator"
    msg, finish = chat_message("42", [CALCULATOR_TOOL], "stop")
    assert finish == "stop" and msg == {"role": "assistant", "content": "42"}


def test_bad_tool_definition_names_the_entry():
    with pytest.raises(ValueError, match=r"tools\[1\]"):
        tool_calls_from_text("x", [CALCULATOR_TOOL, {"type": "function", "function": {}}])
