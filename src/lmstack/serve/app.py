"""The FastAPI application: engine lifecycle, the request gate, health, metrics, the dashboard.

    app = create_app("runs/tiny", api_key=None, max_n=8)      # or an AsyncLLM instance
    app = create_app("runs/base", lora={"sql": "adapters/sql"})  # + LoRA adapters, picked by `model`
    uvicorn.run(app, host="127.0.0.1", port=8000)

One `AsyncLLM` is built at startup inside the server's event loop; its step loop runs
model compute off the loop. Every HTTP request first passes `_Gate`, a plain ASGI
middleware that (1) rejects bodies above `max_body_bytes` with 413 before FastAPI parses
them, (2) checks `Authorization: Bearer <key>` on /v1/* when a key is set, (3) counts
responses by endpoint and status for /metrics, and (4) answers an unexpected exception
with a 500 itself: counted like any response, and the keep-alive connection survives
(an exception that reached uvicorn would close it).

/openapi.json describes the loaded model: `n`, `max_tokens` and token ids carry the
maxima of this server (protocol.publish_limits).
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from lmstack.serve import api, dashboard
from lmstack.serve.convert import Limits
from lmstack.serve.errors import error_body, install_error_handlers
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.protocol import publish_limits

log = logging.getLogger("lmstack.serve")
STATIC_DIR = Path(str(resources.files("lmstack.serve") / "static"))
_COUNTED = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/internal/tokenize",
            "/v1/internal/next_token_distribution", "/v1/internal/attention", "/health", "/metrics"}


class _Gate:
    """Body-size limit, API key and per-endpoint response counting, before any parsing."""

    def __init__(self, app, *, max_body_bytes: int, api_key: str | None, metrics: ServerMetrics):
        self.app, self.max_body_bytes, self.api_key, self.metrics = app, max_body_bytes, api_key, metrics

    async def _reject(self, send, status: int, message: str, headers: list | None = None) -> None:
        body = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())] + (headers or [])})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _COUNTED else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.inc(endpoint=endpoint, status=str(message["status"]))
            await send(message)

        try:
            await self._handle(scope, receive, counting_send)
        except Exception as e:
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if started:  # half a response is out: only closing the connection can end it
                raise
            await self._reject(counting_send, 500, f"internal error: {type(e).__name__}; see the server log")

    async def _handle(self, scope, receive, counting_send):
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and path.startswith("/v1/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode()):
                return await self._reject(counting_send, 401, "missing or wrong API key; send the header "
                                          "'Authorization: Bearer <key>' with the server's --api-key",
                                          [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return await self._reject(counting_send, 400, "Content-Length header is not a number")
            if too_big:
                return await self._reject(counting_send, 413, f"request body of {int(length)} bytes is above "
                                          f"the limit of {self.max_body_bytes} bytes; send less")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, counting_send)
        # Read the body ourselves (bounded), then replay it; later receive() calls go to the
        # server so that disconnects still reach the handlers.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._reject(counting_send, 413, f"request body is above the limit of "
                                          f"{self.max_body_bytes} bytes; send less")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, counting_send)


def _served_name(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).resolve().name or str(model)
    return "lmstack-model"


def _context_length(model) -> int:
    for cfg_name in ("config", "cfg"):
        cfg = getattr(model, cfg_name, None)
        for field in ("context_length", "max_position_embeddings"):
            value = getattr(cfg, field, None)
            if isinstance(value, int):
                return value
    raise ValueError("cannot find the model's context length (config.context_length)")


def create_app(engine_or_path: Any, *, api_key: str | None = None, max_n: int = 8,
               max_body_bytes: int = 1 << 20, served_model_name: str | None = None,
               max_attention_tokens: int = 64, max_tokenize_tokens: int = 8192,
               chat_template: Any = None, engine_kwargs: dict | None = None,
               lora: dict | None = None, production: Any = None, retrieval: Any = None) -> FastAPI:
    """Build the app. `engine_or_path`: a run dir / HF dir (an AsyncLLM is built at startup
    with `engine_kwargs` and the LoRA adapters `lora` = {name: PEFT folder}; a folder that does
    not fit fails the startup, before the server listens), or an engine object with
    AsyncLLM's methods (used as is, serving the adapters in its `lora_names`).
    `chat_template`: a `ChatTemplate` for /v1/chat/completions; by default a folder's own
    (tokenizer_config.json), else lmstack's template when the tokenizer has its tokens.
    `production`: a `lmstack.serve.production.Production` (request log, shadow model, A/B
    split); its extra models are built (from folders) and checked at startup.
    `retrieval`: what answers chat requests from an index (serve/retrieval.py's shape, e.g.
    `lmstack.rag.ServerRetrieval`), or None."""
    if max_n < 1 or max_body_bytes < 1024 or max_tokenize_tokens < 1:
        raise ValueError(f"max_n and max_tokenize_tokens must be >= 1 and max_body_bytes >= 1024, got {max_n}, "
                         f"{max_tokenize_tokens} and {max_body_bytes}")
    metrics = ServerMetrics()
    name = served_model_name or _served_name(engine_or_path)
    if lora and not isinstance(engine_or_path, (str, Path)):
        raise ValueError("lora= is for a model path; an engine you build brings its own adapters "
                         "(AsyncLLM(..., lora={name: dir}))")
    if lora and name in lora:
        raise ValueError(f"LoRA adapter name {name!r} is also the served model's name; rename the adapter")
    if chat_template is None and isinstance(engine_or_path, (str, Path)) and Path(engine_or_path).is_dir():
        from lmstack.tokenizer.chat_template import ChatTemplate
        chat_template = ChatTemplate.from_pretrained(engine_or_path)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = isinstance(engine_or_path, (str, Path))
        if owned:
            from lmstack.infer import AsyncLLM
            engine = AsyncLLM(engine_or_path, lora=lora, **(engine_kwargs or {}))
        else:
            engine = engine_or_path
        tokenizer = engine.tokenizer
        lora_names = list(getattr(engine, "lora_names", None) or [])
        if name in lora_names:      # (an engine passed in; lora= names are checked above)
            raise ValueError(f"LoRA adapter name {name!r} is also the served model's name; rename the adapter")
        # The engine runs the n samples of a request side by side: n cannot exceed its batch.
        batch = (engine_kwargs or {}).get("max_num_seqs", 64) if owned else max_n
        limits = Limits(context_length=_context_length(engine.model), n_vocab=int(tokenizer.n_vocab),
                        max_n=min(max_n, batch))
        if production is not None:
            production.start(engine, engine_kwargs)
        app.state.lm = api.ServeState(engine=engine, tokenizer=tokenizer, model_name=name, limits=limits,
                                      metrics=metrics, chat_template=chat_template, lora_names=lora_names,
                                      production=production, retrieval=retrieval)
        log.info("serving %s (context %d, vocab %d)%s", name, limits.context_length, limits.n_vocab,
                 f" with LoRA adapters {lora_names}" if lora_names else "")
        try:
            yield
        finally:
            if production is not None:
                await production.stop()
            if owned:
                await engine.shutdown()

    app = FastAPI(title="lmstack", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for an lmstack model, plus the dashboard's endpoints.")
    app.state.max_attention_tokens = max_attention_tokens
    app.state.model_path = Path(engine_or_path) if isinstance(engine_or_path, (str, Path)) else None   # dashboard
    app.state.max_tokenize_tokens = max_tokenize_tokens
    install_error_handlers(app)
    app.include_router(api.router)
    app.include_router(dashboard.router)
    generic_openapi = app.openapi

    def openapi() -> dict:
        lm = getattr(app.state, "lm", None)
        if lm is None:         # no model loaded yet: the limits stay markers
            return generic_openapi()
        return publish_limits(generic_openapi(), {"max_n": lm.limits.max_n, "token_id": lm.limits.n_vocab - 1,
                                                  "max_tokens": lm.limits.context_length - 1,
                                                  "retrieval": {} if lm.retrieval else {"enum": [False, None]}})

    app.openapi = openapi

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        engine = app.state.lm.engine
        stats = engine.stats() if hasattr(engine, "stats") else {}
        return PlainTextResponse(metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_Gate, max_body_bytes=max_body_bytes, api_key=api_key, metrics=metrics)
    return app
