"""OpenAI-compatible request and response shapes (pydantic v2), plus the dashboard's.

Requests are validated strictly: `"5"` is not a number and `1.0` is not an integer, as in
OpenAI's API, so a wrong type is a 400 naming the field rather than a silent coercion.
Bounds that depend on the served model or the server's flags (context length, `n`
limit, vocabulary) are checked later, in `app.py`, where those numbers are known.

Field names follow OpenAI's API reference; `top_k`, `min_p`, `repetition_penalty` and
`ignore_eos` are extensions with vLLM's names and meanings.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Largest seed we accept: what fits a signed 64-bit torch.Generator seed.
MAX_SEED = 2**63 - 1


def _check_utf8(s: str) -> str:
    """JSON may carry lone surrogates ("\\ud800") that no UTF-8 tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid UTF-8 (it contains a lone surrogate); send well-formed Unicode") from None
    return s


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send vendor extras such as `user`), but known
    # fields must have exactly the right type and be finite.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str | None = Field(None, description="Served model name; omitted means the one served model.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate; default: the rest of the context.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Completions per prompt (limit set by the server's --max-n).")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings; generation ends before them.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM names).
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="0 or -1 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings are allowed, got {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            _check_utf8(s)
        return v

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, a batch of texts, token ids, or a batch of token-id lists.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top log-probs per token.")
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            return _check_utf8(v)
        if len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        for item in v:
            if isinstance(item, str):
                _check_utf8(item)
            elif isinstance(item, list) and len(item) == 0:
                raise ValueError("a token-id prompt must not be empty")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v):
        return _check_utf8(v)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str):
            _check_utf8(v)
        return v

    @model_validator(mode="after")
    def _needs_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmstack"
    max_model_len: int


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
    prompt: str | None = Field(None, description="Raw text (special tokens in it are honoured).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat, rendered by the template.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return v if v is None else _check_utf8(v)


class TokenizeRequest(_TextInput):
    pass


class NextTokenRequest(_TextInput):
    top_n: int = Field(256, ge=1, le=4096, description="How many of the most likely tokens to return.")


class AttentionRequest(_TextInput):
    pass
