"""Features the server does not have are refused with a 400 naming them, like suffix and
best_of; never a 200 with plain text that the client would take for a forced tool call or JSON.
(Tools themselves are served: test_serve_tool_calls.py.)"""
from __future__ import annotations

import httpx
import pytest

from tests.serve.test_errors import assert_openai_error

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("extra,param,needle", [
    ({"functions": [TOOL["function"]]}, "functions", "functions (the legacy form of tools) are not supported"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice='required' is not supported"),
    ({"tools": [TOOL], "tool_choice": TOOL}, "tool_choice", "this server cannot force a tool call"),
    ({"response_format": {"type": "json_object"}}, "response_format", "response_format type 'json_object'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format",
     "no JSON mode or constrained decoding"),
])
def test_refused_with_a_400(server, extra, param, needle):
    r = httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 2, **extra})
    assert needle in assert_openai_error(r, 400, param)["message"]


@pytest.mark.parametrize("extra", [{"tools": []}, {"tools": [TOOL]}, {"tool_choice": "none"}, {"tool_choice": "auto"},
                                   {"response_format": {"type": "text"}}])
def test_harmless_values_are_accepted(server, extra):
    r = httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


def test_the_schema_says_the_same(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["functions"]["maxItems"] == 0 and props["response_format"]["properties"]["type"]["const"] == "text"
    assert props["tool_choice"]["enum"] == ["none", "auto", None]
