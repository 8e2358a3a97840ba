"""Evaluation in production: opt-in request logging, a shadow model, an A/B split.

    prod = Production("logs/requests.jsonl", sample=0.1,          # log 10% of requests
                      shadow="runs/candidate",                    # also answers them; logged, not returned
                      ab="runs/b", ab_percent=20)                  # 20% of requests answered by runs/b
    app = create_app("runs/a", production=prod)
    lmstack serve runs/a --log-requests logs/requests.jsonl --log-sample 0.1 --shadow runs/candidate
    lmstack eval compare logs/requests.jsonl                       # lmstack.eval.compare_production reads it

Every decision is a pure function of the request's key, so a client retrying a request
lands on the same arm and the same sampling verdict: the key is the client's
`X-Request-Id` header, or else a fresh id (returned as `X-Request-Id`). `bucket(key, salt)`
maps it to [0, 1) through SHA-256; the A/B arm is "b" when bucket(key, "ab") <
ab_percent / 100, and a request is logged when bucket(key, "log") < sample.

Log records are JSON lines, one per model answer, appended with one `write` on a file opened
with O_APPEND (POSIX appends each write whole at the end, so concurrent writers never
interleave a line; a crash can at most leave a torn last line, which the reader skips):

    {"time": 1717000000.1, "key": "...", "endpoint": "/v1/chat/completions", "role": "primary",
     "arm": "a", "model": "a", "input": "<the user's text>", "messages": [...] | "prompt": "...",
     "prompt_tokens": 12, "outputs": ["..."], "finish_reasons": ["stop"], "completion_tokens": 7,
     "latency_s": 0.41, "error": null}

`role` is "primary" for the answer the client got and "shadow" for the shadow model's answer
to the same request (same key, same prompt ids and sampling parameters), started next to
the primary's engine request and never awaited by it: a slow or failing shadow
costs the client nothing, and its failure is logged as that record's `error`. The shadow
and the B model must share the primary's tokenizer (checked at startup): one prompt's ids
go to all of them.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("lmstack.serve")
_PROBE = "The quick brown fox, 12+30=42. <|endoftext|> ü€"


def bucket(key: str, salt: str) -> float:
    """A deterministic number in [0, 1) for a request key (SHA-256 of salt:key)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8", "backslashreplace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


class RequestLog:
    """Append-only JSONL; each record is one write on an O_APPEND descriptor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"cannot open the request log {self.path} for appending ({e.strerror}); "
                             "choose a writable path") from None
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8",
                                                                                            "backslashreplace")
        with self._lock:
            written = os.write(self._fd, line)
        if written != len(line):
            log.error("request log %s: short write (%d of %d bytes)", self.path, written, len(line))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _check_percent(name: str, value: float, top: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
        raise ValueError(f"{name} must be a number in [0, {top}], got {value!r}")


class Production:
    """The server's production-evaluation settings and its extra engines (see the module doc).
    `shadow` and `ab`: a model folder (an AsyncLLM is built at startup with the server's
    engine_kwargs) or an engine object; `*_name`: how the log names them."""

    def __init__(self, log_path: str | os.PathLike | None = None, *, sample: float = 1.0, shadow: Any = None,
                 shadow_name: str | None = None, ab: Any = None, ab_percent: float = 0.0, ab_name: str | None = None):
        _check_percent("sample", sample, 1.0)
        _check_percent("ab_percent", ab_percent, 100.0)
        if shadow is not None and log_path is None:
            raise ValueError("a shadow model's answers go only to the request log: give log_path (--log-requests)")
        if (ab is None) != (ab_percent == 0):
            raise ValueError("an A/B split needs both the B model and a percentage above 0 (--ab-model, "
                             f"--ab-percent); got model {ab!r} and {ab_percent}%")
        self.log_path, self.sample, self.ab_percent = log_path, float(sample), float(ab_percent)
        self.specs = {"shadow": shadow, "b": ab}
        self.names = {"shadow": shadow_name or _name(shadow, "shadow"), "b": ab_name or _name(ab, "b")}
        self.engines: dict[str, Any] = {}
        self.log: RequestLog | None = None
        self._owned: list = []
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ lifecycle (app.py)
    def start(self, primary, engine_kwargs: dict | None = None) -> None:
        """Build (from folders) and check the extra models, open the log; once (a CLI may
        call it before the server starts, to fail with one line)."""
        from lmstack.infer import AsyncLLM

        if self.engines or self.log is not None:
            return
        for role, spec in self.specs.items():
            if spec is None:
                continue
            engine = AsyncLLM(str(spec), **(engine_kwargs or {})) if isinstance(spec, (str, Path)) else spec
            if isinstance(spec, (str, Path)):
                self._owned.append(engine)
            _check_same_tokenizer(primary.tokenizer, engine.tokenizer, role, self.names[role])
            self.engines[role] = engine
        if self.log_path is not None:
            self.log = RequestLog(self.log_path)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in self._owned:
            await engine.shutdown()
        if self.log is not None:
            self.log.close()

    # ------------------------------------------------------------ per request (api.py)
    def arm(self, key: str) -> str:
        return "b" if "b" in self.engines and bucket(key, "ab") < self.ab_percent / 100.0 else "a"

    def logged(self, key: str) -> bool:
        return self.log is not None and bucket(key, "log") < self.sample

    def record(self, entry: dict, role: str, model: str, outputs: list[str], finish: list, completion_tokens: int,
               latency: float, error: str | None = None) -> None:
        self.log.append({"time": time.time(), **entry, "role": role, "model": model, "outputs": outputs,
                         "finish_reasons": finish, "completion_tokens": completion_tokens,
                         "latency_s": round(latency, 6), "error": error})

    def shadow(self, entry: dict, prompts: list[list[int]], params: list) -> None:
        """Run the shadow model on the same prompts in the background; log its answer."""
        engine = self.engines.get("shadow")
        if engine is None:
            return
        task = asyncio.get_running_loop().create_task(self._shadow(engine, entry, prompts, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, engine, entry: dict, prompts, params) -> None:
        t0 = time.perf_counter()
        rid = f"shadow-{entry['key']}-{time.monotonic_ns()}"

        async def one(p: int):
            final = None
            async for out in engine.generate(prompts[p], params[p], f"{rid}-{p}"):
                final = out
            if getattr(final, "error", None) is not None:
                raise RuntimeError(str(final.error))
            return final
        try:
            finals = await asyncio.gather(*(one(p) for p in range(len(prompts))))
        except asyncio.CancelledError:
            raise
        except Exception as e:       # the shadow's fault is recorded, never the client's problem
            self.record(entry, "shadow", self.names["shadow"], [], [], 0, time.perf_counter() - t0,
                        f"{type(e).__name__}: {e}")
            return
        comps = [c for f in finals for c in sorted(f.outputs, key=lambda c: c.index)]
        self.record(entry, "shadow", self.names["shadow"], [c.text for c in comps],
                    [c.finish_reason for c in comps], sum(len(c.token_ids) for c in comps), time.perf_counter() - t0)


def _name(spec: Any, default: str) -> str:
    return Path(spec).resolve().name if isinstance(spec, (str, Path)) else default


def _check_same_tokenizer(primary, other, role: str, name: str) -> None:
    same = int(primary.n_vocab) == int(other.n_vocab)
    if same:
        try:
            same = primary.encode(_PROBE, allowed_special="all") == other.encode(_PROBE, allowed_special="all")
        except Exception:       # noqa: BLE001 (a tokenizer refusing the probe is a different tokenizer)
            same = False
    if not same:
        raise ValueError(f"the {role} model {name!r} does not share the served model's tokenizer (vocabulary "
                         f"{other.n_vocab} vs {primary.n_vocab}, or different ids for the same text); the same "
                         f"prompt ids go to both, so give a model finetuned from the same base")
