"""Tool calls on /v1/chat/completions: OpenAI `tools` in, the model's calls out as `tool_calls`.

    tools = active_tools(body)                  # None: no tools, or tool_choice "none"
    check_tool_turns(body.messages)             # earlier calls and their answers are well formed
    msgs = template_messages(body.messages, jinja=template is not None)
    parser = ToolParser(tools, "call_abc_0_")   # one per choice
    parser.feed(delta) -> content safe to stream now; parser.finish(stop_reason) -> (rest, calls)

The model writes a call as text, in one of the two forms `lmstack.reasoning.tool_calls`
parses: `<calc>EXPR</calc>` (the calculator, as lmstack's tool loop trains it) or
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes/Qwen form of chat
models finetuned for function calling). The closing tags are stop strings, so generation
ends right after a call and the client runs the tool; the engine drops a stop string from
the text, so `finish` puts it back before parsing.

The answer (the same streamed and not): a choice with calls has `finish_reason:
"tool_calls"`, its `tool_calls`, and as `content` the text around them (null when there is
none); no call tag reaches the content. Content is trimmed of surrounding whitespace
whenever tools are active, which is what lets a stream send text before it knows whether
a call follows: it holds back only an unfinished tag (or the start of one) and trailing
whitespace, and every prefix it sent is a prefix of the final content.

A malformed call (a body that is not JSON, arguments that are not an object, a tool the
request did not declare, a tag cut off by max_tokens) is not a call: no `tool_calls`, the
finish_reason generation gave ("stop", or "length"), and the tag stays in the content as
the model wrote it, streamed and not. That is what vLLM's Hermes parser does with JSON it
cannot load: the client sees the model's text (to show, log or retry) and never a call
whose arguments the server had to guess; an error field would be one no OpenAI client reads.

Earlier turns: an assistant message's `tool_calls` and the `role: "tool"` answers are
rendered for the model. A Jinja template gets them as transformers passes them (arguments
as a dict, `tools` as a variable); lmstack's own template, which has no tool role, gets the
call written back as its tag in the assistant's text and the answer as a user turn
`<tool_response>...</tool_response>`. A call whose `arguments` is not a JSON object, or a
tool message that answers no earlier call, is a 400 naming the message.
"""
from __future__ import annotations

import json

from lmstack.tokenizer.tool_calls import CALCULATOR, CALL_CLOSE, CALL_OPEN, tool_calls_from_text
from lmstack.serve.errors import APIError

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_ROLE_ALIASES = {"developer": "system"}


def active_tools(body) -> list[dict] | None:
    """The request's tool definitions whose calls are parsed; None without tools or with
    tool_choice "none". A choice the server cannot honour is a 400."""
    choice = body.tool_choice
    if choice not in (None, "none", "auto"):
        what = "'required'" if choice == "required" else f"{choice!r}"
        raise APIError(400, f"tool_choice={what} is not supported: this server cannot force a tool call; use "
                            f"'auto' (the model decides) or 'none'", param="tool_choice")
    if not body.tools or choice == "none":
        return None
    names = [t.function.name for t in body.tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"tools declares the function {dup!r} twice; give each tool a distinct name",
                       param="tools", code="duplicate_tool_name")
    return [t.model_dump(exclude_none=True) for t in body.tools]


def _arguments(raw: str, where: str) -> dict:
    try:
        args = json.loads(raw)
    except json.JSONDecodeError as e:
        raise APIError(400, f"{where} is not valid JSON ({e.msg} at character {e.pos}); send the arguments "
                            f"as a JSON object in a string, e.g. '{{\"expression\": \"2+2\"}}'",
                       param=where, code="invalid_tool_call") from None
    if not isinstance(args, dict):
        raise APIError(400, f"{where} must be a JSON object, got {type(args).__name__}", param=where,
                       code="invalid_tool_call")
    return args


def check_tool_turns(messages) -> list[dict | None]:
    """Per message, its calls' parsed arguments (None for a message without calls); every
    tool message must answer a call of an earlier assistant message."""
    called: set[str] = set()
    parsed: list = []
    for k, m in enumerate(messages):
        if m.tool_calls:
            parsed.append([_arguments(c.function.arguments, f"messages[{k}].tool_calls[{j}].function.arguments")
                           for j, c in enumerate(m.tool_calls)])
            called.update(c.id for c in m.tool_calls)
        else:
            parsed.append(None)
        if m.role == "tool" and m.tool_call_id not in called:
            raise APIError(400, f"messages[{k}] answers tool_call_id {m.tool_call_id!r}, which no earlier "
                                f"assistant message called; a tool message follows the assistant message whose "
                                f"tool_calls hold that id", param=f"messages[{k}].tool_call_id",
                           code="invalid_tool_call")
    return parsed


def call_text(name: str, args: dict) -> str:
    """A call as the model writes it (the inverse of the parser)."""
    if name == CALCULATOR and set(args) == {"expression"} and isinstance(args["expression"], str):
        return f"{CALL_OPEN}{args['expression']}{CALL_CLOSE}"
    return f"{TOOL_OPEN}{json.dumps({'name': name, 'arguments': args})}{TOOL_CLOSE}"


def template_messages(messages, jinja: bool) -> list[dict]:
    """The messages as the chat template takes them (see the module doc)."""
    parsed = check_tool_turns(messages)
    out = []
    for m, args in zip(messages, parsed):
        role = _ROLE_ALIASES.get(m.role, m.role)
        if jinja:
            d = {"role": role, "content": m.text() if m.content is not None or not m.tool_calls else None,
                 "name": m.name, "tool_call_id": m.tool_call_id}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": a}}
                                   for c, a in zip(m.tool_calls, args)]
            out.append(d)
        elif m.role == "tool":
            out.append({"role": "user", "content": f"{RESPONSE_OPEN}{m.text()}{RESPONSE_CLOSE}", "name": m.name})
        else:
            calls = "".join(call_text(c.function.name, a) for c, a in zip(m.tool_calls or [], args or []))
            out.append({"role": role, "content": m.text() + calls, "name": m.name})
    return out


def stop_strings(tools: list[dict]) -> list[str]:
    """The closing tags generation stops at: one call per turn, then the client runs it."""
    names = {t["function"]["name"] for t in tools}
    return ([CALL_CLOSE] if CALCULATOR in names else []) + [TOOL_CLOSE]


def _openers(tools: list[dict]) -> list[tuple[str, str]]:
    names = {t["function"]["name"] for t in tools}
    return ([(CALL_OPEN, CALL_CLOSE)] if CALCULATOR in names else []) + [(TOOL_OPEN, TOOL_CLOSE)]


def safe_end(text: str, pairs: list[tuple[str, str]]) -> int:
    """Where the text stops being final: at an opening tag with no closing tag after it, or
    at a trailing partial opening tag ('<ca'); else its length."""
    pos = 0
    while True:
        hits = [(i, o, c) for o, c in pairs if (i := text.find(o, pos)) >= 0]
        if not hits:
            break
        i, o, c = min(hits)
        j = text.find(c, i + len(o))
        if j < 0:
            return i
        pos = j + len(c)
    for k in range(max(len(o) for o, _ in pairs) - 1, 0, -1):
        if any(k < len(o) and text.endswith(o[:k]) for o, _ in pairs) and len(text) - k >= pos:
            return len(text) - k
    return len(text)


class ToolParser:
    """One choice's text -> streamable content, then its final content and tool calls."""

    def __init__(self, tools: list[dict], id_prefix: str):
        self.tools, self.id_prefix, self.pairs = tools, id_prefix, _openers(tools)
        self.text = ""          # raw model text so far
        self.sent = ""          # content already streamed

    def _content(self, text: str) -> tuple[str, list[dict]]:
        content, calls = tool_calls_from_text(text, self.tools, id_prefix=self.id_prefix)
        return (content or "").strip(), calls

    def _advance(self, content: str) -> str:
        if not content.startswith(self.sent):     # cannot happen (see the module doc); never resend
            return ""
        delta, self.sent = content[len(self.sent):], content
        return delta

    def feed(self, delta: str) -> str:
        """Add model text; returns the content that can be sent now."""
        self.text += delta
        content, _ = self._content(self.text[:safe_end(self.text, self.pairs)])
        return self._advance(content)

    def finish(self, stop_reason) -> tuple[str, str | None, list[dict]]:
        """-> (content not yet sent, the whole content or None, tool calls). `stop_reason`:
        the stop string generation ended on; a closing tag is put back when it closes a tag
        the text left open (a stray one stays dropped, as any stop string is)."""
        if stop_reason in (CALL_CLOSE, TOOL_CLOSE) and safe_end(self.text, self.pairs) < len(self.text):
            self.text += stop_reason
        content, calls = self._content(self.text)
        rest = self._advance(content)
        return rest, (content if content or not calls else None), calls


def message(parser: ToolParser, stop_reason, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message and finish_reason of a finished, unstreamed choice."""
    _, content, calls = parser.finish(stop_reason)
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
