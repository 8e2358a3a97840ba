"""The OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

A request is validated (protocol.py), tokenized off the event loop, checked against the
model's limits and mapped onto SamplingParams (convert.py); then the engine's cumulative
outputs are turned into either one JSON response or a stream of server-sent events:

    data: {"id": ..., "choices": [{"index": 0, "delta": {"content": "Hel"}, ...}]}\\n\\n
    ...
    data: [DONE]\\n\\n

If the client goes away mid-stream, Starlette cancels the stream; the `finally` below
aborts every engine request that has not finished, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmstack.serve import convert
from lmstack.serve.errors import APIError, error_body
from lmstack.serve.metrics import ServerMetrics
from lmstack.utils.errors import LmstackError
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
    created: int = field(default_factory=lambda: int(time.time()))


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"
ERROR_RESPONSES = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           413: {"model": ErrorResponse}}


def _stream_doc(model) -> dict:
    doc = dict(ERROR_RESPONSES)
    doc[200] = {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                "description": "JSON, or server-sent events when `stream` is true"}
    return doc


@dataclass
class _Choice:
    """Streaming bookkeeping for one completion (one prompt x one of its n samples)."""
    sent_text: str = ""
    sent_tokens: int = 0
    last_time: float = 0.0
    finish_reason: str | None = None


class _Run:
    """One HTTP request's engine work: one engine request per prompt, merged in arrival order."""

    def __init__(self, state: ServeState, prompts: list[list[int]], params: list, n: int, t0: float):
        self.state, self.prompts, self.params, self.n, self.t0 = state, prompts, params, n, t0
        base = uuid.uuid4().hex
        self.request_ids = [f"{base}-{p}" for p in range(len(prompts))]
        self.choices = [_Choice() for _ in range(len(prompts) * n)]
        self.final: list[Any] = [None] * len(prompts)
        self.unfinished = set(self.request_ids)
        self.first_token_seen = False

    async def _outputs(self) -> AsyncIterator[tuple[int, Any]]:
        engine = self.state.engine
        if len(self.prompts) == 1:
            async for out in engine.generate(self.prompts[0], self.params[0], self.request_ids[0]):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int) -> None:
            try:
                async for out in engine.generate(self.prompts[p], self.params[p], self.request_ids[p]):
                    queue.put_nowait((p, out, None))
            except Exception as e:  # surfaced to the consumer below
                queue.put_nowait((p, None, e))
            queue.put_nowait((p, None, StopAsyncIteration()))

        tasks = [asyncio.create_task(pump(p)) for p in range(len(self.prompts))]
        try:
            live = len(tasks)
            while live:
                p, out, err = await queue.get()
                if isinstance(err, StopAsyncIteration):
                    live -= 1
                elif err is not None:
                    raise err
                else:
                    yield p, out
        finally:
            for t in tasks:
                t.cancel()

    async def events(self) -> AsyncIterator[tuple[int, str, list[int], list | None, str | None]]:
        """(choice index, new text, new token ids, their logprobs, finish_reason or None)."""
        m = self.state.metrics
        async for p, out in self._outputs():
            self.final[p] = out
            now = time.perf_counter()
            for comp in out.outputs:
                ch = self.choices[p * self.n + comp.index]
                if ch.finish_reason is not None:
                    continue
                done = comp.finish_reason is not None or bool(out.finished)
                new_ids = list(comp.token_ids[ch.sent_tokens:])
                if new_ids:
                    k = len(new_ids)
                    if not self.first_token_seen:
                        self.first_token_seen = True
                        m.ttft.observe(now - self.t0)
                    elif ch.sent_tokens:
                        gap = (now - ch.last_time) / k  # several tokens in one step share the gap
                        for _ in range(k):
                            m.itl.observe(gap)
                    m.generation_tokens.inc(k)
                    ch.last_time = now
                text = convert.stable_text(comp.text, done)
                delta = text[len(ch.sent_text):] if text.startswith(ch.sent_text) else ""
                ch.sent_text += delta
                new_lps = comp.logprobs[ch.sent_tokens:] if comp.logprobs is not None else None
                ch.sent_tokens += len(new_ids)
                if done:
                    ch.finish_reason = comp.finish_reason or "stop"
                if delta or new_ids or done:
                    yield p * self.n + comp.index, delta, new_ids, new_lps, ch.finish_reason
            if out.finished:
                self.unfinished.discard(self.request_ids[p])
        m.e2e.observe(time.perf_counter() - self.t0)

    async def abort_unfinished(self) -> None:
        # Shielded: this runs while Starlette is cancelling the stream of a departed client.
        with anyio.CancelScope(shield=True):
            for rid in list(self.unfinished):
                await self.state.engine.abort(rid)
                self.state.metrics.aborted.inc()
            self.unfinished.clear()

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(ch.sent_tokens for ch in self.choices)
        cached = sum(int(getattr(out, "num_cached_tokens", 0) or 0) for out in self.final if out is not None)
        return convert.usage(prompt, completion, cached)


def _event_stream(run: _Run, chunks: AsyncIterator[bytes]) -> StreamingResponse:
    """SSE response around `chunks`; an engine failure becomes an error event, and whatever
    ends the stream (done, error, client gone) aborts the engine requests still running."""
    async def stream():
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            yield _sse(error_body(500, f"generation failed: {type(e).__name__}: {e}"))
        finally:
            await run.abort_unfinished()
        yield _SSE_DONE
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


router = APIRouter()


def state_of(request: Request) -> ServeState:
    return request.app.state.lm


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request):
    s = state_of(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                        "owned_by": "lmstack", "max_model_len": s.limits.context_length}]}


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
    convert.check_model(body.model, s.model_name)
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server; drop it", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of other than n is not supported; drop best_of", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (no prompt log-probs); drop one", param="echo")
    prompts = await _encode_all(s, convert.completion_prompts(body, s.tokenizer, s.limits))
    # Each prompt gets its own max_tokens (default: the rest of its context).
    params = [convert.sampling_params(body, convert.resolve_max_tokens(body.max_tokens, len(ids), s.limits,
                                                                       "max_tokens"),
                                      s.limits, logprobs=body.logprobs) for ids in prompts]
    s.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    run = _Run(s, prompts, params, body.n, t0)
    echo_text = [s.tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    cid, created = f"cmpl-{run.request_ids[0][:24]}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def logprobs_obj(ids, lps, offset):
        if body.logprobs is None:
            return None
        return convert.completion_logprobs(s.tokenizer, ids, lps, body.logprobs, offset)

    if body.stream:
        async def chunks():
            head = {"id": cid, "object": "text_completion", "created": created, "model": s.model_name}
            if include_usage:
                head["usage"] = None
            if body.echo:
                for i in range(len(run.choices)):
                    yield _sse({**head, "choices": [{"index": i, "text": echo_text[i // body.n],
                                                     "logprobs": None, "finish_reason": None}]})
            async for idx, delta, ids, lps, finish in run.events():
                offset = len(echo_text[idx // body.n]) + len(run.choices[idx].sent_text) - len(delta)
                yield _sse({**head, "choices": [{"index": idx, "text": delta, "finish_reason": finish,
                                                 "logprobs": logprobs_obj(ids, lps, offset)}]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})
        return _event_stream(run, chunks())

    texts = [""] * len(run.choices)
    ids_all: list[list[int]] = [[] for _ in run.choices]
    lps_all: list[list] = [[] for _ in run.choices]
    await _collect(request, run, texts, ids_all, lps_all)
    choices = []
    for i, ch in enumerate(run.choices):
        prefix = echo_text[i // body.n]
        choices.append({"index": i, "text": prefix + texts[i], "finish_reason": ch.finish_reason,
                        "logprobs": logprobs_obj(ids_all[i], lps_all[i], len(prefix))})
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": s.model_name,
                         "choices": choices, "usage": run.usage()})


async def _collect(request: Request, run: _Run, texts, ids_all, lps_all) -> None:
    """Run a non-streaming request to the end; abort it if the client disconnects first."""
    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                await run.abort_unfinished()
                return

    watcher = asyncio.create_task(watch())
    try:
        async for idx, delta, ids, lps, _ in run.events():
            texts[idx] += delta
            ids_all[idx] += ids
            if lps is not None:
                lps_all[idx] += lps
    except LmstackError as e:  # the engine's own door check (RequestError)
        raise APIError(400, str(e)) from None
    finally:
        watcher.cancel()
        await run.abort_unfinished()


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=_stream_doc(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    t0 = time.perf_counter()
    s = state_of(request)
    convert.check_model(body.model, s.model_name)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    ids = await asyncio.to_thread(convert.chat_prompt_ids, body.messages, s.tokenizer)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = convert.resolve_max_tokens(requested, len(ids), s.limits, param)
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = convert.sampling_params(body, max_tokens, s.limits, logprobs=k,
                                     stop_token_ids=convert.chat_stop_token_ids(s.tokenizer))
    s.metrics.prompt_tokens.inc(len(ids))
    run = _Run(s, [ids], [params], body.n, t0)
    cid, created = f"chatcmpl-{run.request_ids[0][:24]}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def logprobs_obj(tids, lps):
        return None if k is None else convert.chat_logprobs(s.tokenizer, tids, lps, k)

    if body.stream:
        async def chunks():
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.model_name}
            if include_usage:
                head["usage"] = None
            for i in range(body.n):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            async for idx, delta, tids, lps, finish in run.events():
                if delta or tids:
                    yield _sse({**head, "choices": [{"index": idx, "delta": {"content": delta},
                                                     "logprobs": logprobs_obj(tids, lps), "finish_reason": None}]})
                if finish is not None:
                    yield _sse({**head, "choices": [{"index": idx, "delta": {}, "logprobs": None,
                                                     "finish_reason": finish}]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})
        return _event_stream(run, chunks())

    texts = [""] * body.n
    ids_all: list[list[int]] = [[] for _ in range(body.n)]
    lps_all: list[list] = [[] for _ in range(body.n)]
    await _collect(request, run, texts, ids_all, lps_all)
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": logprobs_obj(ids_all[i], lps_all[i]), "finish_reason": ch.finish_reason}
               for i, ch in enumerate(run.choices)]
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": s.model_name,
                         "choices": choices, "usage": run.usage()})
