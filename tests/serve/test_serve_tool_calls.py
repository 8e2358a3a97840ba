"""Tool calls through /v1/chat/completions, with the official `openai` client, against a
scripted model whose reply we choose: its call tags come back as OpenAI `tool_calls`
(hand-written expected shapes), `finish_reason: "tool_calls"`, the same result streamed
and not, no tag text in any streamed `content` delta; the next request's `role: "tool"`
answer is accepted and rendered; malformed arguments and unanswered ids are 400s. The
last tests render a tool conversation with lmstack's own template on the tiny run dir and
compare with the tokenizer's own rendering of the same turns written as text."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from lmstack.infer import AsyncLLM
from lmstack.reasoning import CALCULATOR_TOOL
from lmstack.serve.app import create_app
from lmstack.tokenizer.chat_template import ChatTemplate
from tests.infer.conftest import ByteTokenizer, ScriptedModel

TEMPLATE = ("{% for m in messages %}{{ m.role }}:{{ m.content if m.content is defined else '' }}"
            "{% for c in m.tool_calls or [] %}[call {{ c.id }} {{ c.function.name }} "
            "{{ c.function.arguments | tojson }}]{% endfor %}\n{% endfor %}"
            "{% if tools %}tools:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}A:")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
USER = [{"role": "user", "content": "what is 47+38?"}]


def render(messages, tools=None) -> str:
    """The prompt text the server must build (jinja2 directly, the template's own engine)."""
    import jinja2

    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)      # as transformers renders
    env.filters["tojson"] = json.dumps
    return env.from_string(TEMPLATE).render(messages=plain, tools=tools, add_generation_prompt=True)


@pytest.fixture(scope="module")
def scripted(launch):
    model = ScriptedModel([0], context_length=512)
    engine = AsyncLLM(model, tokenizer=ByteTokenizer(), block_size=4, kv_cache_tokens=4096)
    app = create_app(engine, max_n=2, served_model_name="scripted", chat_template=ChatTemplate(TEMPLATE))
    url, stop = launch(app)
    yield url, model
    stop()
    asyncio.run(engine.shutdown())


def say(model, messages, reply: str, tools=None) -> None:
    """Make the model answer `messages` with `reply` then end of text (position-scripted)."""
    n = len(render(messages, tools).encode())
    model.script = torch.tensor([0] * n + list(reply.encode()) + [256])


@pytest.fixture(scope="module")
def client(scripted):
    return openai.OpenAI(base_url=scripted[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, messages, tools, stream: bool, **kw):
    """(content, tool_calls as dicts, finish_reason, streamed content deltas)."""
    args = dict(model="scripted", messages=messages, tools=tools, **{"max_tokens": 120, "temperature": 0, **kw})
    if not stream:
        c = client.chat.completions.create(**args).choices[0]
        calls = [t.model_dump() for t in c.message.tool_calls] if c.message.tool_calls else []
        return c.message.content, calls, c.finish_reason, None
    content, calls, finish, deltas = None, {}, None, []
    for chunk in client.chat.completions.create(stream=True, **args):
        ch = chunk.choices[0]
        if ch.delta.content:
            deltas.append(ch.delta.content)
            content = (content or "") + ch.delta.content
        for t in ch.delta.tool_calls or []:
            calls[t.index] = {"id": t.id, "type": t.type, "function": {"name": t.function.name,
                                                                       "arguments": t.function.arguments}}
        finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, deltas


def strip_ids(calls):
    return [{**c, "id": None} for c in calls]


CASES = [
    ("Let me compute. <calc>47+38</calc>", [CALCULATOR_TOOL],
     "Let me compute.", [("calculator", {"expression": "47+38"})]),
    (' <tool_call>{"name": "get_weather", "arguments": {"city": "Tinar"}}</tool_call>', [WEATHER, CALCULATOR_TOOL],
     None, [("get_weather", {"city": "Tinar"})]),
    ("  It is 85.  ", [CALCULATOR_TOOL], "It is 85.", []),
    ("a < b and <calc is not a tag", [CALCULATOR_TOOL], "a < b and <calc is not a tag", []),
]


@pytest.mark.parametrize("reply,tools,content,calls", CASES)
def test_calls_come_back_as_tool_calls_streamed_and_not(scripted, client, reply, tools, content, calls):
    say(scripted[1], USER, reply, tools)
    full = ask(client, USER, tools, stream=False)
    streamed = ask(client, USER, tools, stream=True)
    for got_content, got_calls, finish, _ in (full, streamed):
        assert got_content == content
        assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == \
            [("function", name, args) for name, args in calls]
        assert finish == ("tool_calls" if calls else "stop")
        assert all(c["id"].startswith("call_") for c in got_calls)
    assert strip_ids(full[1]) == strip_ids(streamed[1])
    # Text streamed before the model's call was known; never a tag, never retracted.
    for d in streamed[3]:
        assert "<calc>" not in d and "<tool_call>" not in d


BAD_CALLS = [    # (reply, max_tokens, finish_reason): none is a call of a declared tool
    ('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', 120, "stop"),  # bad JSON
    ('<tool_call>{"name": "get_weather", "arguments": "Tinar"}</tool_call>', 120, "stop"),     # args not an object
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', 120, "stop"),             # undeclared tool
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Ti', 40, "length"),            # cut off mid-call
]


@pytest.mark.parametrize("reply,max_tokens,finish", BAD_CALLS)
def test_a_malformed_call_is_kept_as_content_streamed_and_not(scripted, client, reply, max_tokens, finish):
    """vLLM's Hermes parser: a <tool_call> it cannot parse gives no tool_calls and the model's
    text as content, finish_reason unchanged. The client sees what the model wrote (to log,
    show or retry) and never a call it would have to guess the arguments of."""
    say(scripted[1], USER, reply, [WEATHER])
    full = ask(client, USER, [WEATHER], stream=False, max_tokens=max_tokens)
    streamed = ask(client, USER, [WEATHER], stream=True, max_tokens=max_tokens)
    want = reply[:max_tokens].strip()              # the byte tokenizer: one token per character
    assert full[:3] == (want, [], finish)
    assert streamed[:3] == (want, [], finish)


def test_without_tools_or_with_tool_choice_none_the_text_is_content(scripted, client):
    reply = "ok <calc>1+1</calc>"
    say(scripted[1], USER, reply, [CALCULATOR_TOOL])
    content, calls, finish, _ = ask(client, USER, [CALCULATOR_TOOL], stream=False, tool_choice="none")
    # tool_choice none: nothing parsed, and the engine does not stop at </calc> either
    assert (content, calls, finish) == (reply, [], "stop")
    say(scripted[1], USER, reply)
    r = client.chat.completions.create(model="scripted", messages=USER, max_tokens=120, temperature=0)
    assert r.choices[0].message.content == reply and r.choices[0].message.tool_calls is None


def test_the_tool_answer_is_accepted_and_rendered(scripted, client):
    say(scripted[1], USER, "<calc>47+38</calc>", [CALCULATOR_TOOL])
    first = client.chat.completions.create(model="scripted", messages=USER, tools=[CALCULATOR_TOOL], max_tokens=120,
                                           temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = USER + [first.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "85"}]
    # what the template must receive: arguments as a dict (as transformers passes them)
    expected = USER + [{"role": "assistant", "tool_calls": [{"id": call.id, "type": "function", "function": {
        "name": "calculator", "arguments": {"expression": "47+38"}}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "85"}]
    say(scripted[1], expected, "47+38 = 85.", [CALCULATOR_TOOL])
    r = client.chat.completions.create(model="scripted", messages=history, tools=[CALCULATOR_TOOL], max_tokens=120,
                                       temperature=0)
    assert r.usage.prompt_tokens == len(render(expected, [CALCULATOR_TOOL]).encode())
    assert r.choices[0].message.content == "47+38 = 85." and r.choices[0].finish_reason == "stop"


CALL = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1/0"}'}}


@pytest.mark.parametrize("messages,param,needle", [
    ([*USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "calculator",
                                                                          "arguments": '{"expression": '}}]}],
     "messages[1].tool_calls[0].function.arguments", "is not valid JSON"),
    ([*USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "calculator", "arguments": "[1]"}}]}],
     "messages[1].tool_calls[0].function.arguments", "must be a JSON object"),
    ([*USER, {"role": "tool", "tool_call_id": "call_9", "content": "85"}],
     "messages[1].tool_call_id", "which no earlier assistant message called"),
])
def test_malformed_tool_turns_are_400s(scripted, messages, param, needle):
    r = httpx.post(scripted[0] + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "invalid_tool_call" and needle in err["message"]


@pytest.mark.parametrize("extra,param,needle", [
    ({"tools": [CALCULATOR_TOOL], "tool_choice": "required"}, "tool_choice", "cannot force a tool call"),
    ({"tools": [CALCULATOR_TOOL, CALCULATOR_TOOL]}, "tools", "declares the function 'calculator' twice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "pattern"),
    ({"messages": [{"role": "tool", "content": "85"}]}, None, "needs 'tool_call_id'"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, None, "cannot carry 'tool_calls'"),
])
def test_bad_tool_requests_name_the_problem(scripted, extra, param, needle):
    r = httpx.post(scripted[0] + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and (param is None or err["param"] == param)


def test_own_template_renders_calls_and_answers_as_text(server):
    """lmstack's template has no tool role: the call is written back as its tag, the answer
    as a user turn; the prompt equals the tokenizer's rendering of those text turns."""
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.load(server.run_dir / "tokenizer.json")
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "calculator", "arguments": '{"expression": "47+38"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "85"}]
    text_turns = USER + [{"role": "assistant", "content": "<calc>47+38</calc>"},
                         {"role": "user", "content": "<tool_response>85</tool_response>"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": history, "tools": [CALCULATOR_TOOL],
                                                              "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.apply_chat_template(text_turns, add_generation_prompt=True))


def test_streamable_content_is_always_a_prefix_of_the_final_one():
    """ToolParser fed one character at a time: what it lets out never has to be taken back."""
    from lmstack.serve.tools import ToolParser

    texts = ["  Hi,\n there <calc>1+2</calc>", "x <calc>1</calc> y", "<cal", "a <tool_call>{bad}</tool_call> b",
             " \n ", "stray </calc> closer", "done <calc>7*6"]
    for text in texts:
        for stop in (None, "</calc>"):
            p = ToolParser([CALCULATOR_TOOL], "call_")
            sent = "".join(p.feed(ch) for ch in text)
            rest, content, calls = p.finish(stop)
            assert (sent + rest) == (content or "")
            assert "<calc>" not in sent or "<calc>" in (content or "")
