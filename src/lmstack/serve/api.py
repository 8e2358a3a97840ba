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

Streaming, failures and disconnects are handled in generation.py; tool calls (chat `tools`
in, `tool_calls` out) in tools.py; answers grounded in a retrieval index (a server started
with one; `sources` in the response) in retrieval.py. /v1/completions with `echo` and `logprobs` also returns
the prompt's log-probs (first one null), and `max_tokens: 0` with `echo` scores the prompt
alone, as lm-eval's OpenAI backend asks. When the server has a `Production` (production.py),
`route` picks each request's A/B arm from its key (header X-Request-Id, echoed back with
X-Lmstack-Arm), and a logged request is also sent to the shadow model.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lmstack.serve import convert
from lmstack.serve import generation, retrieval, tools
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
    production: Any = None           # production.Production: request log, shadow, A/B split; or None
    retrieval: Any = None            # what answers chat with retrieval (retrieval.py), or None
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


@dataclass
class Route:
    """Where one request goes (see production.py): its key, A/B arm, engine, log entry."""
    key: str
    arm: str
    engine: Any
    model: str                       # the name the log gives the answering model
    entry: dict | None               # the log record's request fields; None = not logged


def route(s: ServeState, request: Request, lora: str | None, endpoint: str) -> Route:
    key = request.headers.get("x-request-id") or uuid.uuid4().hex
    prod = s.production
    arm = prod.arm(key) if prod is not None and lora is None else "a"
    engine = prod.engines["b"] if arm == "b" else s.engine
    model = prod.names["b"] if arm == "b" else (lora or s.model_name)
    entry = {"key": key, "endpoint": endpoint, "arm": arm} if prod is not None and prod.logged(key) else None
    return Route(key, arm, engine, model, entry)


def log_request(s: ServeState, r: Route, run: generation.Run, fields: dict) -> None:
    """Start the shadow now; `log_answer` writes the primary's record when it is done."""
    if r.entry is None:
        return
    r.entry.update(fields, prompt_tokens=sum(len(p) for p in run.prompts))
    s.production.shadow(r.entry, run.prompts, run.params)


def log_answer(s: ServeState, r: Route, run: generation.Run) -> None:
    if r.entry is not None:
        s.production.record(r.entry, "primary", r.model, [ch.sent_text for ch in run.choices],
                            [ch.finish_reason for ch in run.choices], sum(ch.sent_tokens for ch in run.choices),
                            time.perf_counter() - run.t0)


def with_route(response, r: Route, s: ServeState):
    response.headers["x-request-id"] = r.key
    if s.production is not None and "b" in s.production.engines:
        response.headers["x-lmstack-arm"] = r.arm
    return response


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
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens=0 generates nothing: it is only for echo=true (scoring the prompt); "
                            "set max_tokens >= 1", param="max_tokens")
    raw_prompts = convert.completion_prompts(body, s.tokenizer, s.limits)
    prompts = await _encode_all(s, raw_prompts)
    # echo with logprobs scores the prompt too; max_tokens=0 generates nothing: the engine
    # still runs one step (its prefill scores the prompt) and that token is dropped.
    score_prompt = body.echo and body.logprobs is not None
    prompt_only = body.max_tokens == 0
    # Each prompt gets its own max_tokens (default: the rest of its context).
    params = [convert.sampling_params(body, 1 if prompt_only else convert.resolve_max_tokens(
                  body.max_tokens, len(ids), s.limits, "max_tokens"), s.limits, logprobs=body.logprobs,
                  prompt_logprobs=body.logprobs if score_prompt else None) for ids in prompts]
    s.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    r = route(s, request, lora, "/v1/completions")
    run = generation.Run(s, prompts, params, body.n, t0, lora, engine=r.engine)
    texts_in = [p if isinstance(p, str) else s.tokenizer.decode(p) for p in raw_prompts] if r.entry else []
    log_request(s, r, run, {"input": "\n".join(texts_in), "prompt": texts_in})
    echo_text = [s.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    cid, created = f"cmpl-{run.request_ids[0][:24]}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def logprobs_obj(ids, lps, offset):
        if body.logprobs is None:
            return None
        return convert.completion_logprobs(s.tokenizer, ids, lps, body.logprobs, offset)

    def echo_logprobs(i: int):
        """The echoed prompt's logprobs object (choice i), or None without them."""
        if not score_prompt:
            return None
        p = i // body.n
        return logprobs_obj(prompts[p], getattr(run.final[p], "prompt_logprobs", None), 0)

    def usage() -> dict:
        u = run.usage()
        if prompt_only:
            u.update(completion_tokens=0, total_tokens=u["prompt_tokens"])
        return u

    if body.stream:
        async def chunks():
            head = {"id": cid, "object": "text_completion", "created": created, "model": model}
            if include_usage:
                head["usage"] = None
            echoed = set()
            if body.echo and not score_prompt:      # known before the engine runs
                for i in range(len(run.choices)):
                    echoed.add(i)
                    yield generation.sse({**head, "choices": [{"index": i, "text": echo_text[i // body.n],
                                                               "logprobs": None, "finish_reason": None}]})
            async for idx, delta, ids, lps, finish in run.events():
                if body.echo and idx not in echoed:   # its prompt's log-probs exist once it has run
                    echoed.add(idx)
                    yield generation.sse({**head, "choices": [{"index": idx, "text": echo_text[idx // body.n],
                                                               "logprobs": echo_logprobs(idx), "finish_reason": None}]})
                if prompt_only:
                    delta, ids, lps = "", [], []
                offset = len(echo_text[idx // body.n]) + len(run.choices[idx].sent_text) - len(delta)
                if delta or ids or finish is not None:
                    yield generation.sse({**head, "choices": [{"index": idx, "text": delta, "finish_reason": finish,
                                                               "logprobs": logprobs_obj(ids, lps, offset)}]})
            if include_usage:
                yield generation.sse({**head, "choices": [], "usage": usage()})
            log_answer(s, r, run)
        await generation.start_stream(request, run)
        return with_route(generation.event_stream(run, chunks(), "/v1/completions"), r, s)

    texts = [""] * len(run.choices)
    ids_all: list[list[int]] = [[] for _ in run.choices]
    lps_all: list[list] = [[] for _ in run.choices]
    await generation.collect(request, run, texts, ids_all, lps_all)
    choices = []
    for i, ch in enumerate(run.choices):
        prefix = echo_text[i // body.n]
        text, ids, lps = ("", [], []) if prompt_only else (texts[i], ids_all[i], lps_all[i])
        lp = logprobs_obj(ids, lps, len(prefix))
        head = echo_logprobs(i)
        if head is not None:
            lp = {key: head[key] + lp[key] for key in lp}
        choices.append({"index": i, "text": prefix + text, "finish_reason": ch.finish_reason, "logprobs": lp})
    log_answer(s, r, run)
    return with_route(JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": model,
                                    "choices": choices, "usage": usage()}), r, s)


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    """Features this server does not have get a 400, never a 200 that silently ignores them."""
    if body.functions:
        raise APIError(400, "functions (the legacy form of tools) are not supported; send them as tools: "
                            "[{\"type\": \"function\", \"function\": {...}}]", param="functions")
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
    tool_defs = tools.active_tools(body)
    tool_json = [t.model_dump(exclude_none=True) for t in body.tools or []]
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if body.max_tokens is not None and body.max_tokens >= s.limits.context_length:   # shadowed, still checked
        raise APIError(400, f"max_tokens={body.max_tokens} can never fit this model's context of "
                            f"{s.limits.context_length} tokens; set max_tokens <= {s.limits.context_length - 1}",
                       param="max_tokens", code="context_length_exceeded")
    grounding = await retrieval.ground(s, body, tool_json, requested) if retrieval.wanted(s, body) else None
    if grounding is not None and grounding.abstained:
        return retrieval.abstention(s, body, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), model)
    ids = grounding.ids if grounding is not None else \
        await asyncio.to_thread(convert.chat_prompt_ids, body.messages, s.tokenizer, s.chat_template, tool_json)
    sources = {} if grounding is None else {"sources": grounding.sources}    # the chunks the model read
    max_tokens = convert.resolve_max_tokens(requested, len(ids), s.limits, param)
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = convert.sampling_params(body, max_tokens, s.limits, logprobs=k,
                                     stop_token_ids=convert.chat_stop_token_ids(s.tokenizer, s.chat_template),
                                     extra_stop=tools.stop_strings(tool_defs) if tool_defs else None)
    s.metrics.prompt_tokens.inc(len(ids))
    r = route(s, request, lora, "/v1/chat/completions")
    run = generation.Run(s, [ids], [params], body.n, t0, lora, engine=r.engine)
    if r.entry is not None:
        log_request(s, r, run, {"input": "\n".join(m.text() for m in body.messages if m.role in ("user", "tool")),
                                "messages": [m.model_dump(exclude_none=True) for m in body.messages]})
    cid, created = f"chatcmpl-{run.request_ids[0][:24]}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    parsers = [tools.ToolParser(tool_defs, f"call_{run.request_ids[0][:12]}_{i}_") if tool_defs else None
               for i in range(body.n)]

    def logprobs_obj(tids, lps):
        return None if k is None else convert.chat_logprobs(s.tokenizer, tids, lps, k)

    if body.stream:
        async def chunks():
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            if include_usage:
                head["usage"] = None

            def chunk(idx, delta, finish=None, lp=None, extra=None):
                return generation.sse({**head, **(extra or {}), "choices": [{"index": idx, "delta": delta,
                                                                             "logprobs": lp, "finish_reason": finish}]})
            for i in range(body.n):
                yield chunk(i, {"role": "assistant", "content": ""}, extra=sources if i == 0 else None)
            async for idx, delta, tids, lps, finish in run.events():
                parser = parsers[idx]
                if parser is not None:
                    delta = parser.feed(delta)
                if delta or tids:
                    yield chunk(idx, {"content": delta}, lp=logprobs_obj(tids, lps))
                if finish is None:
                    continue
                if parser is not None:
                    rest, _, calls = parser.finish(run.stop_reason(idx))
                    if rest:
                        yield chunk(idx, {"content": rest})
                    if calls:
                        yield chunk(idx, {"tool_calls": [{"index": j, **c} for j, c in enumerate(calls)]})
                        finish = "tool_calls"
                yield chunk(idx, {}, finish)
            if include_usage:
                yield generation.sse({**head, "choices": [], "usage": run.usage()})
            log_answer(s, r, run)
        await generation.start_stream(request, run)
        return with_route(generation.event_stream(run, chunks(), "/v1/chat/completions"), r, s)

    texts = [""] * body.n
    ids_all: list[list[int]] = [[] for _ in range(body.n)]
    lps_all: list[list] = [[] for _ in range(body.n)]
    await generation.collect(request, run, texts, ids_all, lps_all)
    choices = []
    for i, ch in enumerate(run.choices):
        message, finish = {"role": "assistant", "content": texts[i]}, ch.finish_reason
        if parsers[i] is not None:
            parsers[i].text = texts[i]
            message, finish = tools.message(parsers[i], run.stop_reason(i), finish)
        choices.append({"index": i, "message": message, "logprobs": logprobs_obj(ids_all[i], lps_all[i]),
                        "finish_reason": finish})
    log_answer(s, r, run)
    return with_route(JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                    "choices": choices, "usage": run.usage(), **sources}), r, s)
