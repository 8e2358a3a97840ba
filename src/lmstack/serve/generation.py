"""One HTTP request's engine work, and how it reaches the client.

`Run` submits one engine request per prompt (n samples each), merges their cumulative
outputs in arrival order and turns them into per-choice deltas (new text, new token ids,
their log-probs, finish reason); it keeps the latency metrics. Around it:

- `collect` runs a non-streaming request to the end;
- `start_stream` waits for the engine's first output before the server answers, so a
  request the engine refuses still gets a real status (400 for a bad request, 500 for a
  failure of the server), not a 200 stream;
- `event_stream` sends the deltas as server-sent events; a failure after the first one
  ends the stream with an error event (`data: {"error": {...}}` then `data: [DONE]`),
  counted in lmstack_stream_errors_total.

A failure fails its own HTTP request only: the engine and other requests go on. A client
that goes away (mid-stream, or while its request waits) aborts the engine requests still
running, which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from lmstack.infer import RequestError
from lmstack.serve import convert
from lmstack.serve.errors import APIError, error_body

log = logging.getLogger("lmstack.serve")
# Characters that str.splitlines() (and so httpx's iter_lines) takes for line ends but JSON
# leaves raw; one inside a token would cut an SSE frame in two. Escaped, they are still
# the same JSON string.
_SSE_ESCAPES = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_SSE_ESCAPES)
    # A lone surrogate cannot be UTF-8; written as the JSON escape "\ud800" it stays valid JSON.
    return b"data: " + text.encode("utf-8", "backslashreplace") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class GenerationError(Exception):
    """The engine ended one request with a fault (RequestOutput.error, "ExcType: message")."""


def failure(e: Exception) -> APIError:
    """An exception from the engine as the client's answer: the engine's own door check
    (RequestError) is the request's fault; anything else is the server's."""
    if isinstance(e, RequestError):
        return APIError(400, str(e))
    detail = " ".join(str(e).split())[:300]
    if isinstance(e, GenerationError):   # the engine's message already names the exception type
        log.error("generation failed: %s", detail)
    else:
        log.error("generation failed", exc_info=e)
        detail = type(e).__name__ + (f": {detail}" if detail else "")
    return APIError(500, f"generation failed ({detail}); other requests are unaffected", code="generation_failed")


@dataclass
class _Choice:
    """Streaming bookkeeping for one completion (one prompt x one of its n samples)."""
    sent_text: str = ""
    sent_tokens: int = 0
    last_time: float = 0.0
    finish_reason: str | None = None


class Run:
    """One HTTP request's engine work: one engine request per prompt, merged in arrival order."""

    def __init__(self, state, prompts: list[list[int]], params: list, n: int, t0: float, lora: str | None = None,
                 engine=None):
        # state: api.ServeState (engine, metrics); params: one SamplingParams per prompt; lora:
        # the LoRA adapter every prompt runs with (None = the base); engine: another engine
        # than state.engine (an A/B split's B model)
        self.state, self.prompts, self.params, self.n, self.t0 = state, prompts, params, n, t0
        self.engine = engine if engine is not None else state.engine
        # only passed when set: an engine serving no adapters need not know the argument
        self._lora = {"lora_request": lora} if lora is not None else {}
        base = uuid.uuid4().hex
        self.request_ids = [f"{base}-{p}" for p in range(len(prompts))]
        self.choices = [_Choice() for _ in range(len(prompts) * n)]
        self.final: list[Any] = [None] * len(prompts)
        self.unfinished = set(self.request_ids)
        self.first_token_seen = False
        self._stream: AsyncIterator | None = None
        self._first: tuple | None = None

    async def _outputs(self) -> AsyncIterator[tuple[int, Any]]:
        engine = self.engine
        if len(self.prompts) == 1:
            async for out in engine.generate(self.prompts[0], self.params[0], self.request_ids[0], **self._lora):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int) -> None:
            try:
                async for out in engine.generate(self.prompts[p], self.params[p], self.request_ids[p], **self._lora):
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

    async def start(self) -> None:
        """Submit the prompts and wait for the first event, so that a refusal or a failure
        before any token can still be answered with its own HTTP status."""
        self._stream = self._events()
        try:
            self._first = await self._stream.__anext__()
        except StopAsyncIteration:
            self._first = None

    async def events(self) -> AsyncIterator[tuple[int, str, list[int], list | None, str | None]]:
        """(choice index, new text, new token ids, their logprobs, finish_reason or None)."""
        if self._stream is None:
            self._stream = self._events()
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for event in self._stream:
            yield event

    async def _events(self) -> AsyncIterator[tuple[int, str, list[int], list | None, str | None]]:
        m = self.state.metrics
        async for p, out in self._outputs():
            error = getattr(out, "error", None)
            if error is not None:       # that engine request has ended; the others are aborted
                self.unfinished.discard(self.request_ids[p])
                raise GenerationError(str(error))
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

    async def abort_unfinished(self, client_gone: bool = True) -> None:
        """Abort the engine requests still running: the client left (counted), or another
        prompt of the same HTTP request failed (client_gone=False)."""
        # Shielded: this runs while Starlette is cancelling the stream of a departed client.
        with anyio.CancelScope(shield=True):
            for rid in list(self.unfinished):
                await self.engine.abort(rid)
                if client_gone:
                    self.state.metrics.aborted.inc()
            self.unfinished.clear()

    def stop_reason(self, idx: int):
        """The stop string (or token id) choice `idx` ended on; None for another ending."""
        out = self.final[idx // self.n]
        comp = next((c for c in getattr(out, "outputs", []) if c.index == idx % self.n), None)
        return getattr(comp, "stop_reason", None)

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(ch.sent_tokens for ch in self.choices)
        cached = sum(int(getattr(out, "num_cached_tokens", 0) or 0) for out in self.final if out is not None)
        return convert.usage(prompt, completion, cached)


@contextlib.asynccontextmanager
async def abort_on_disconnect(request: Request, run: Run):
    """While the handler waits on the engine, a client that leaves aborts its requests."""
    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                await run.abort_unfinished()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def start_stream(request: Request, run: Run) -> None:
    async with abort_on_disconnect(request, run):
        try:
            await run.start()
        except Exception as e:
            await run.abort_unfinished(client_gone=False)
            raise failure(e) from None


def event_stream(run: Run, chunks: AsyncIterator[bytes], endpoint: str) -> StreamingResponse:
    """SSE response around `chunks`; a failure becomes an error event (counted), and whatever
    ends the stream (done, error, client gone) aborts the engine requests still running."""
    async def stream():
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            await run.abort_unfinished(client_gone=False)
            err = failure(e)
            run.state.metrics.stream_errors.inc(endpoint=endpoint)
            yield sse(error_body(err.status, err.message, err.param, err.code))
        finally:
            await run.abort_unfinished()
        yield SSE_DONE
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def collect(request: Request, run: Run, texts, ids_all, lps_all) -> None:
    """Run a non-streaming request to the end; abort it if the client disconnects first."""
    try:
        async with abort_on_disconnect(request, run):
            async for idx, delta, ids, lps, _ in run.events():
                texts[idx] += delta
                ids_all[idx] += ids
                if lps is not None:
                    lps_all[idx] += lps
    except Exception as e:
        await run.abort_unfinished(client_gone=False)
        raise failure(e) from None
    finally:
        await run.abort_unfinished()
