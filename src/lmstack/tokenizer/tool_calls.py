"""Raw model output -> OpenAI `tool_calls`: a pure function the server can call.

The tool-call tags are part of the chat format, so this lives beside the chat template (floor 1):
the server (floor 4) and the reasoning tool loop (floor 5) both read it from here.

    content, calls = tool_calls_from_text("sure. <calc>47+38</calc>", [CALCULATOR_TOOL])
    # content == "sure."
    # calls == [{"id": "call_0", "type": "function",
    #            "function": {"name": "calculator", "arguments": '{"expression": "47+38"}'}}]

Two tag forms are recognised:
  * `<calc>EXPR</calc>`, lmstack's calculator call (what the reasoning tool loop trains and
    runs), maps to the tool named `calculator` with arguments {"expression": EXPR};
  * `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the Hermes/Qwen form that
    chat models finetuned for function calling emit, maps to any declared tool.
A tag becomes a call only when its tool is declared in `tools` (the request's `tools`
list) and, for `<tool_call>`, its body is a JSON object with a string `name` and an object
`arguments`; anything else stays in the content as the model wrote it, so no text is lost
and no undeclared call reaches the client. An unterminated tag also stays content.

For the server (`/v1/chat/completions`): when generation stopped on the stop string
`</calc>` (or `</tool_call>`), append it back before calling (`text + out.stop_reason`),
since the engine drops stop strings from the text. Then `chat_message(text, tools,
finish_reason)` gives the assistant message and the finish_reason: "tool_calls" when
there is at least one call (OpenAI then sets `content` to null when no text remains).
"""
from __future__ import annotations

import json
import re

CALL_OPEN, CALL_CLOSE = "<calc>", "</calc>"
CALCULATOR = "calculator"
# The OpenAI tool definition of the calculator, for clients and tests.
CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": CALCULATOR,
        "description": "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}

_TAG = re.compile(r"<calc>(.*?)</calc>|<tool_call>(.*?)</tool_call>", re.DOTALL)


def tool_names(tools: list[dict] | None) -> set[str]:
    """Names of the function tools of an OpenAI `tools` list; raises ValueError on a bad entry."""
    names = set()
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}, "
                             f"got {t!r}")
        names.add(fn["name"])
    return names


def _parse(match: re.Match, names: set[str]) -> tuple[str, dict] | None:
    """(name, arguments) of one tag, or None when it is not a valid call of a declared tool."""
    calc, generic = match.group(1), match.group(2)
    if calc is not None:
        return (CALCULATOR, {"expression": calc.strip()}) if CALCULATOR in names else None
    try:
        body = json.loads(generic)
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or body["name"] not in names:
        return None
    args = body.get("arguments", {})
    return (body["name"], args) if isinstance(args, dict) else None


def tool_calls_from_text(text: str, tools: list[dict] | None,
                         id_prefix: str = "call_") -> tuple[str | None, list[dict]]:
    """Split raw output into (content without the call tags, OpenAI tool_calls).

    content is None when nothing but calls remains (what OpenAI returns with tool_calls).
    Call ids are `id_prefix` + index in order of appearance (the server may prefix a request id)."""
    names = tool_names(tools)
    if not names:
        return text, []
    calls: list[dict] = []
    pieces: list[str] = []
    pos = 0
    for m in _TAG.finditer(text):
        parsed = _parse(m, names)
        if parsed is None:
            continue                                   # stays in the content verbatim
        name, args = parsed
        pieces.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"{id_prefix}{len(calls)}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args)}})
    if not calls:
        return text, []
    pieces.append(text[pos:])
    content = " ".join(p.strip() for p in pieces if p.strip())
    return (content or None), calls


def chat_message(text: str, tools: list[dict] | None, finish_reason: str | None) -> tuple[dict, str | None]:
    """(assistant message, finish_reason) for one chat completion choice."""
    content, calls = tool_calls_from_text(text, tools)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
