"""The OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

The `model` field picks the base (its served name, or left out) or one of the LoRA adapters
the server was started with (`--lora name=DIR`); /v1/models lists them all, each adapter with
the base as its `parent` (as vLLM does), and responses echo the name asked for.

A request is validated (protocol.py), tokenized off the event loop, checked against the
model's limits and mapped onto SamplingParams (convert.py); then the engine's cumulative
outputs are turned into either one JSON response or a stream of server-sent events:

    data: {"id": ..., "choices": [{"index": 0, "delta": {"content": "Hel"}, ...}]}\\n\\n
    ...
    data: [DONE]\\n\\n

Streaming, failures and disconnects are handled in generation.py.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lmstack.serve import convert
from lmstack.serve import generation
from lmstack.serve.errors import APIError
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, ErrorResponse, ModelList)


@dataclass
class ServeState:
    """What every handler needs: the engine and the numbers requests are checked against."""
    engine: Any                      # lmstack.infer.AsyncLLM (or anything with its methods)
    tokenizer: Any
    model_name: str
    limits: convert.Limits
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    chat_template: Any = None        # lmstack.tokenizer.chat_template.ChatTemplate, or None
    lora_names: list[str] = field(default_factory=list)   # LoRA adapters served over the base
    created: int = field(default_factory=lambda: int(time.time()))


ERROR_RESPONSES = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                   413: {"model": ErrorResponse}, 500: {"model": ErrorResponse}}


def _stream_doc(model) -> dict:
    doc = dict(ERROR_RESPONSES)
    doc[200] = {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": "JSON, or server-sent events when `stream` is true"}
    return doc


router = APIRouter()


def state_of(request: Request) -> ServeState:
    return request.app.state.lm


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request):
    s = state_of(request)
    card = {"object": "model", "created": s.created, "owned_by": "lmstack", "max_model_len": s.limits.context_length}
    return {"object": "list", "data": [{"id": s.model_name, **card, "parent": None}] +
            [{"id": name, **card, "parent": s.model_name} for name in s.lora_names]}


async def _encode_all(s: ServeState, prompts: list) -> list[list[int]]:
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(await asyncio.to_thread(lambda: [convert.encode_text(s.tokenizer, t) for t in texts]))
    out = [next(encoded) if isinstance(p, str) else p for p in prompts]
    for i, ids in enumerate(out):
        if not ids:
            raise APIError(400, f"prompt[{i}] is empty; send at least one token", param="prompt")
    return out


@router.post("/v1/completions", response_model=CompletionResponse, responses=_stream_doc(CompletionResponse))
async def completions(body: CompletionRequest, request: Request):
    t0 = time.perf_counter()
    s = state_of(request)
    lora = convert.check_model(body.model, s.model_name, s.lora_names)
    model = lora or s.model_name
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server; drop it", param="suffix")
    if body.best_of not in (None, 1):
        raise APIError(400, "best_of other than 1 is not supported (no extra candidates); drop best_of",
                       param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (no prompt log-probs); drop one", param="echo")
    prompts = await _encode_all(s, convert.completion_prompts(body, s.tokenizer, s.limits))
    # Each prompt gets its own max_tokens (default: the rest of its context).
    params = [convert.sampling_params(body, convert.resolve_max_tokens(body.max_tokens, len(ids), s.limits,
                                                                       "max_tokens"),
                                      s.limits, logprobs=body.logprobs) for ids in prompts]
    s.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    run = generation.Run(s, prompts, params, body.n, t0, lora)
    echo_text = [s.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    cid, created = f"cmpl-{run.request_ids[0][:24]}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def logprobs_obj(ids, lps, offset):
        if body.logprobs is None:
            return None
        return convert.completion_logprobs(s.tokenizer, ids, lps, body.logprobs, offset)

    if body.stream:
        async def chunks():
            head = {"id": cid, "object": "text_completion", "created": created, "model": model}
            if include_usage:
                head["usage"] = None
            if body.echo:
                for i in range(len(run.choices)):
                    yield generation.sse({**head, "choices": [{"index": i, "text": echo_text[i // body.n],
                                                     "logprobs": None, "finish_reason": None}]})
            async for idx, delta, ids, lps, finish in run.events():
                offset = len(echo_text[idx // body.n]) + len(run.choices[idx].sent_text) - len(delta)
                yield generation.sse({**head, "choices": [{"index": idx, "text": delta, "finish_reason": finish,
                                                 "logprobs": logprobs_obj(ids, lps, offset)}]})
            if include_usage:
                yield generation.sse({**head, "choices": [], "usage": run.usage()})
        await generation.start_stream(request, run)
        return generation.event_stream(run, chunks(), "/v1/completions")

    texts = [""] * len(run.choices)
    ids_all: list[list[int]] = [[] for _ in run.choices]
    lps_all: list[list] = [[] for _ in run.choices]
    await generation.collect(request, run, texts, ids_all, lps_all)
    choices = []
    for i, ch in enumerate(run.choices):
        prefix = echo_text[i // body.n]
        choices.append({"index": i, "text": prefix + texts[i], "finish_reason": ch.finish_reason,
                        "logprobs": logprobs_obj(ids_all[i], lps_all[i], len(prefix))})
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": run.usage()})


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Features this server does not have yet get a 400, never a 200 that silently ignores them."""
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise APIError(400, f"{name} are not supported by this server yet (it cannot make tool calls); "
                                f"drop {name}", param=name)
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, f"tool_choice={body.tool_choice!r} is not supported (there are no tools to call); "
                            f"drop tool_choice", param="tool_choice")
    fmt = body.response_format
    if fmt is not None and fmt.get("type") != "text":
        raise APIError(400, f"response_format type {fmt.get('type')!r} is not supported by this server yet (no "
                            f"JSON mode or constrained decoding); drop response_format or use "
                            f"{{\"type\": \"text\"}}", param="response_format")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=_stream_doc(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    t0 = time.perf_counter()
    s = state_of(request)
    lora = convert.check_model(body.model, s.model_name, s.lora_names)
    model = lora or s.model_name
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    _refuse_unsupported(body)
    ids = await asyncio.to_thread(convert.chat_prompt_ids, body.messages, s.tokenizer, s.chat_template)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if body.max_tokens is not None and body.max_tokens >= s.limits.context_length:   # shadowed, still checked
        raise APIError(400, f"max_tokens={body.max_tokens} can never fit this model's context of "
                            f"{s.limits.context_length} tokens; set max_tokens <= {s.limits.context_length - 1}",
                       param="max_tokens", code="context_length_exceeded")
    max_tokens = convert.resolve_max_tokens(requested, len(ids), s.limits, param)
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = convert.sampling_params(body, max_tokens, s.limits, logprobs=k,
                                     stop_token_ids=convert.chat_stop_token_ids(s.tokenizer, s.chat_template))
    s.metrics.prompt_tokens.inc(len(ids))
    run = generation.Run(s, [ids], [params], body.n, t0, lora)
    cid, created = f"chatcmpl-{run.request_ids[0][:24]}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def logprobs_obj(tids, lps):
        return None if k is None else convert.chat_logprobs(s.tokenizer, tids, lps, k)

    if body.stream:
        async def chunks():
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            if include_usage:
                head["usage"] = None
            for i in range(body.n):
                yield generation.sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            async for idx, delta, tids, lps, finish in run.events():
                if delta or tids:
                    yield generation.sse({**head, "choices": [{"index": idx, "delta": {"content": delta},
                                                     "logprobs": logprobs_obj(tids, lps), "finish_reason": None}]})
                if finish is not None:
                    yield generation.sse({**head, "choices": [{"index": idx, "delta": {}, "logprobs": None,
                                                     "finish_reason": finish}]})
            if include_usage:
                yield generation.sse({**head, "choices": [], "usage": run.usage()})
        await generation.start_stream(request, run)
        return generation.event_stream(run, chunks(), "/v1/chat/completions")

    texts = [""] * body.n
    ids_all: list[list[int]] = [[] for _ in range(body.n)]
    lps_all: list[list] = [[] for _ in range(body.n)]
    await generation.collect(request, run, texts, ids_all, lps_all)
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": logprobs_obj(ids_all[i], lps_all[i]), "finish_reason": ch.finish_reason}
               for i, ch in enumerate(run.choices)]
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": run.usage()})
