"""Evaluation in production: the request log, the shadow model and the A/B split, on scripted
models whose every answer we know in advance (so the log is checked against those texts),
and the log's append under concurrent writers."""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading

import httpx
import pytest

from lmstack.infer import AsyncLLM
from lmstack.serve.app import create_app
from lmstack.serve.production import Production, RequestLog
from tests.infer.conftest import ByteTokenizer, ScriptedModel

A_TEXT, B_TEXT, SHADOW_TEXT = "a" * 32, "b" * 32, "s" * 32
COMP = "/v1/completions"


def engine(text: str) -> AsyncLLM:
    """A model that writes `text`'s letters whatever the prompt (one repeated letter)."""
    return AsyncLLM(ScriptedModel(list(text.encode())), tokenizer=ByteTokenizer(), block_size=4, kv_cache_tokens=2048)


def expected_bucket(key: str, salt: str) -> float:
    """The documented rule: the first 8 bytes of SHA-256("salt:key"), big-endian, / 2**64."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2.0 ** 64


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prod_server(launch, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("prodlog") / "requests.jsonl"
    engines = [engine(A_TEXT), engine(B_TEXT), engine(SHADOW_TEXT)]
    prod = Production(log_path, sample=0.5, shadow=engines[2], shadow_name="cand", ab=engines[1], ab_percent=30,
                      ab_name="bee")
    app = create_app(engines[0], max_n=2, served_model_name="alpha", production=prod)
    url, stop = launch(app)
    yield url, log_path, prod
    stop()
    for e in engines:
        asyncio.run(e.shutdown())


def test_split_sampling_and_shadow_follow_the_request_key(prod_server):
    url, log_path, prod = prod_server
    keys = [f"req-{i}" for i in range(40)]
    with httpx.Client(base_url=url, timeout=60) as c:
        for i, key in enumerate(keys):
            body = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
            if i % 2:
                r = c.post(COMP, json=body, headers={"x-request-id": key})
                text = r.json()["choices"][0]["text"]
            else:     # streamed: the answer is logged when the stream ends
                r = c.post(COMP, json={**body, "stream": True}, headers={"x-request-id": key})
                text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
                               if line.startswith("data: {"))
            arm = "b" if expected_bucket(key, "ab") < 0.30 else "a"
            assert r.headers["x-lmstack-arm"] == arm and r.headers["x-request-id"] == key
            assert text == (B_TEXT if arm == "b" else A_TEXT)[:3]
        again = c.post(COMP, json={"prompt": "x", "max_tokens": 1}, headers={"x-request-id": keys[0]})
        assert again.headers["x-lmstack-arm"] == ("b" if expected_bucket(keys[0], "ab") < 0.30 else "a")

    async def settle():     # the shadow runs in the background; wait for its records
        for _ in range(200):
            if not prod._tasks:
                return
            await asyncio.sleep(0.05)
    asyncio.run(settle())
    logged = {k for k in keys if expected_bucket(k, "log") < 0.5}
    recs = [r for r in records(log_path) if r["key"] in keys]
    primary = {r["key"]: r for r in recs if r["role"] == "primary"}
    shadow = {r["key"]: r for r in recs if r["role"] == "shadow"}
    assert set(primary) == logged and set(shadow) == logged and 0 < len(logged) < len(keys)
    for key in logged:
        p, s = primary[key], shadow[key]
        arm = "b" if expected_bucket(key, "ab") < 0.30 else "a"
        assert (p["arm"], p["model"], p["outputs"]) == (arm, "bee" if arm == "b" else "alpha",
                                                       [(B_TEXT if arm == "b" else A_TEXT)[:3]])
        assert (s["model"], s["outputs"], s["error"]) == ("cand", [SHADOW_TEXT[:3]], None)
        assert p["input"] == s["input"] == "hi" and p["prompt_tokens"] == 2 and p["completion_tokens"] == 3
        assert p["endpoint"] == COMP and p["finish_reasons"] == ["length"]


def test_chat_requests_are_logged_with_their_messages(launch, tmp_path):
    from lmstack.tokenizer.chat_template import ChatTemplate

    log_path = tmp_path / "chat.jsonl"
    e = engine(A_TEXT)
    app = create_app(e, served_model_name="alpha", production=Production(log_path),
                     chat_template=ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}"))
    url, stop = launch(app)
    try:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and "x-lmstack-arm" not in r.headers
    finally:
        stop()
        asyncio.run(e.shutdown())
    [rec] = records(log_path)
    assert rec["messages"] == msgs and rec["input"] == "hello" and rec["outputs"] == [A_TEXT[:4]]
    assert rec["arm"] == "a" and rec["role"] == "primary"


@pytest.mark.parametrize("kwargs,needle", [
    ({"sample": 1.5}, "sample must be a number in [0, 1.0]"),
    ({"shadow": "runs/x", "log_path": None}, "give log_path"),
    ({"ab": "runs/x"}, "needs both the B model and a percentage"),
    ({"ab_percent": 101}, "ab_percent must be a number in [0, 100.0]"),
])
def test_bad_settings_are_refused(kwargs, needle, tmp_path):
    kwargs.setdefault("log_path", tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        Production(kwargs.pop("log_path"), **kwargs)


def test_a_model_with_another_tokenizer_is_refused(run_dir, tmp_path):
    from lmstack.infer import AsyncLLM as Engine

    prod = Production(tmp_path / "x.jsonl", shadow=engine(A_TEXT))
    primary = Engine(str(run_dir), kv_cache_tokens=256)
    try:
        with pytest.raises(ValueError, match="does not share the served model's tokenizer"):
            prod.start(primary)
    finally:
        asyncio.run(primary.shutdown())
        asyncio.run(prod.specs["shadow"].shutdown())


def test_concurrent_appends_keep_every_line_whole(tmp_path):
    log = RequestLog(tmp_path / "log.jsonl")
    payload = "x" * 5000       # larger than a pipe buffer: a line must still arrive whole

    def writer(t):
        for i in range(50):
            log.append({"writer": t, "i": i, "text": payload})
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    got = records(tmp_path / "log.jsonl")
    assert sorted((r["writer"], r["i"]) for r in got) == [(t, i) for t in range(8) for i in range(50)]
    assert all(r["text"] == payload for r in got)
