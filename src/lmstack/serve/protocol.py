"""OpenAI-compatible request and response shapes (pydantic v2), plus the dashboard's.

Requests are validated strictly: `"5"` is not a number and `1.5` is not an integer, as in
OpenAI's API, so a wrong type is a 400 naming the field rather than a silent coercion.
(`5.0` is an integer: JSON, and so JSON Schema, do not tell it from `5`.)

The OpenAPI schema generated from these models is a promise: a request it allows is
accepted (tests/serve/test_fuzz.py holds the server to it). So every rule the server
applies is written here as schema, cross-field rules included (`if`/`then`, `oneOf`).
Bounds that depend on the served model or the server's flags (the `n` limit, the
vocabulary, the context) are marked `x-lmstack-limit` and filled in by `publish_limits`
when the server has loaded its model. What no JSON Schema can say is a prompt's length in
tokens: those refusals carry the codes in TOKEN_COUNT_CODES.

Field names follow OpenAI's API reference; `top_k`, `min_p`, `repetition_penalty` and
`ignore_eos` are extensions with vLLM's names and meanings.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# Largest seed we accept: the largest integer that every JSON client (and the OpenAPI
# document, whose bounds FastAPI writes as floats) represents exactly; torch takes it.
MAX_SEED = 2**53 - 1
MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP = 16
MAX_TOOLS = 128
# Error codes of refusals that count tokens, which a JSON Schema cannot express.
TOKEN_COUNT_CODES = ("context_length_exceeded", "too_many_tokens")
# Refusals of what a JSON Schema cannot say about a chat: two tools of one name, a tool call's
# `arguments` string that is not a JSON object, a tool message answering no call of the chat.
TOOL_CODES = ("invalid_tool_call", "duplicate_tool_name")
SCHEMA_BLIND_CODES = TOKEN_COUNT_CODES + TOOL_CODES
LIMIT = "x-lmstack-limit"   # schema marker: this integer's maximum is known once a model is loaded


def _check_utf8(s: str) -> str:
    """JSON may carry lone surrogates ("\\ud800") that no UTF-8 tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid UTF-8 (it contains a lone surrogate); send well-formed Unicode") from None
    return s


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def integer(**bounds: Any) -> Any:
    """An integer field type: 5 or 5.0, never "5" or 5.5. Bounds (ge, le, json_schema_extra)
    go inside, next to the int, so the JSON schema states them on the integer itself."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Text = Annotated[str, AfterValidator(_check_utf8)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_check_utf8)]
TokenId = integer(ge=0, json_schema_extra={LIMIT: "token_id"})


def _limited(kind: str) -> dict:
    return {LIMIT: kind}


def publish_limits(spec: dict, bounds: dict[str, int | dict]) -> dict:
    """A copy of the OpenAPI `spec` with every `x-lmstack-limit` marker replaced by the
    `maximum` it stands for (`bounds`: max_n, token_id, max_tokens), or by the schema keywords
    a dict bound holds (retrieval: {"enum": [false, null]} on a server without an index)."""
    spec = copy.deepcopy(spec)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            kind = node.pop(LIMIT, None)
            if kind in bounds:
                bound = bounds[kind]
                node.update(bound if isinstance(bound, dict) else {"maximum": bound})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return spec


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send vendor extras such as `user`), but known
    # fields must have exactly the right type and be finite.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: Text | None = Field(None, description="Served model name; omitted means the one served model.")
    max_tokens: integer(ge=1, json_schema_extra=_limited("max_tokens")) | None = Field(
        None, description="Tokens to generate; default: the rest of the context.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: integer(ge=1, json_schema_extra=_limited("max_n")) = Field(
        1, description="Completions per prompt (limit set by the server's --max-n).")
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} strings; generation ends before them.")
    seed: integer(ge=0, le=MAX_SEED) | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Extensions (vLLM names).
    top_k: integer(ge=-1, le=1_000_000) | None = Field(None, description="0 or -1 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


_Batch = Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)


class CompletionRequest(_SamplingRequest):
    # max_tokens=0 only scores the prompt (echo: its tokens and, with logprobs, their
    # log-probs, the first one null), as lm-eval's OpenAI backend and OpenAI's legacy API do.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
        "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]}})

    max_tokens: integer(ge=0, json_schema_extra=_limited("max_tokens")) | None = Field(
        None, description="Tokens to generate; default: the rest of the context. 0 (with echo) scores the "
                          "prompt only.")

    prompt: (NonEmptyText | Annotated[list[NonEmptyText], _Batch] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], _Batch]) = Field(
        ..., description=f"Text, a batch of texts, token ids, or a batch of token-id lists (at most "
                         f"{MAX_PROMPTS_PER_REQUEST} prompts).")
    logprobs: integer(ge=0, le=20) | None = Field(None, description="Return this many top log-probs per token "
                                                  "(with echo, for the prompt's tokens too).")
    echo: bool = False     # max_tokens=0 without echo: refused in api.py (the schema's if/then)
    # Refused with a message of their own in api.py; the schema states the same bounds.
    best_of: integer(json_schema_extra={"minimum": 1, "maximum": 1}) | None = Field(
        None, description="Only 1: extra candidates are not supported.")
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0},
                               description="Not supported: only an empty suffix.")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDef(_Strict):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments object.")
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(_Strict):
    name: FunctionName
    arguments: Text = Field(..., description="The arguments as a JSON object, in a string (as OpenAI sends them).")


class ToolCall(_Strict):
    id: NonEmptyText
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    # Only an assistant turn may omit its content (when it carried tool calls); only an
    # assistant turn carries tool_calls; a tool turn answers one call, named by tool_call_id.
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"role": {"const": "assistant"}}},
         "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}},
                                                          "tool_calls": {"type": "null"}}}},
        {"if": {"properties": {"role": {"const": "tool"}}},
         "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
         "else": {"properties": {"tool_call_id": {"type": "null"}}}}]})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    tool_call_id: NonEmptyText | None = None

    @model_validator(mode="after")
    def _needs_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot carry 'tool_calls' (only an assistant message can)")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs 'tool_call_id' (the id of the call it answers)"
                             if self.role == "tool" else f"a {self.role} message cannot carry 'tool_call_id'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}})

    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: integer(ge=0, le=20) | None = Field(None, description="Needs logprobs: true.")
    max_completion_tokens: integer(ge=1, json_schema_extra=_limited("max_tokens")) | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="Functions the model may call; its calls come back as `tool_calls`.")
    # Not supported, and refused rather than ignored: api.py answers 400 with a message of its
    # own; the schema states the same bounds.
    functions: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0},
                                                   description="Not supported (legacy; use tools): only an empty list.")
    tool_choice: Any = Field(None, json_schema_extra={"enum": ["none", "auto", None]},
                             description="'auto' (default with tools) or 'none' (no calls parsed); the server "
                                         "cannot force a call ('required' or a named function).")
    response_format: dict[str, Any] | None = Field(
        None, json_schema_extra={"properties": {"type": {"const": "text"}}, "required": ["type"]},
        description='Only {"type": "text"}: no JSON mode or JSON schema (constrained decoding) yet.')
    retrieval: bool | None = Field(
        None, json_schema_extra=_limited("retrieval"),
        description="lmstack: on a server started with an index (--rag-index), false answers without retrieval "
                    "(default: the last user message is answered from the retrieved chunks, listed in the "
                    "response's `sources`); true on a server without one is a 400.")


# ---------------------------------------------------------------- responses

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class Source(BaseModel):
    index: int                       # the [n] of the prompt that listed it
    doc_id: str
    start: int                       # character span of the chunk in its document
    end: int
    text: str
    score: float                     # the retriever's (BM25, cosine or fused rank score)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    sources: list[Source] | None = Field(None, description="lmstack, with retrieval: the chunks the model read")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmstack"
    max_model_len: int
    parent: str | None = Field(None, description="For a LoRA adapter, the base model it runs on (as vLLM).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ------------------------------------------------------------ dashboard (internal)

class _TextInput(_Strict):
    """Exactly one of `prompt` and `messages` (checked in dashboard.py). Their defaults of
    None are not part of the schema: an explicit null is refused."""
    one_of: ClassVar[tuple[str, str]] = ("prompt", "messages")
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    prompt: NonEmptyText = Field(None, description="Raw text (special tokens in it are honoured).")
    messages: list[ChatMessage] = Field(None, min_length=1, description="Chat, rendered by the chat template.")


class TokenizeRequest(_TextInput):
    prompt: Text = Field(None, description="Raw text (special tokens in it are honoured); may be empty.")


class NextTokenRequest(_TextInput):
    top_n: integer(ge=1, le=4096) = Field(256, description="How many of the most likely tokens to return.")
    # The sampler's settings (SamplingParams' meanings): the distribution they give is computed
    # over the whole vocabulary, as the engine samples it.
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: integer(ge=0, le=1_000_000) = Field(0, description="0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)


class AttentionRequest(_TextInput):
    pass
