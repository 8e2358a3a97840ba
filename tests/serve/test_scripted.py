"""The real server around a scripted model, whose every token we know in advance:

- a fault in one request (the engine's per-request error, or any exception out of the
  engine) fails that request alone, with a 500 (or an SSE error event once streaming),
  while concurrent requests complete; /metrics counts the 500 and the failed stream;
- generated text holding U+2028 / U+0085 / U+2029 reaches a line-splitting client
  (httpx iter_lines) intact: the SSE frames escape them;
- a model without any chat template answers chat requests with a 400 naming --chat-template.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from lmstack.infer import AsyncLLM
from lmstack.serve.app import create_app
from lmstack.serve.generation import sse
from tests.infer.conftest import ByteTokenizer, ScriptedModel

BAD = 200                                           # the id the tokenizer below cannot decode
SEPARATORS = "x\u2028y\u0085z\u2029w"               # what str.splitlines() splits on, among letters
SCRIPT = list(SEPARATORS.encode()) + list(b"abcd") + [BAD] + [ord(" ")] * 60
COMP = "/v1/completions"


class FaultyTokenizer(ByteTokenizer):
    def decode_bytes(self, ids):
        if BAD in ids:
            raise RuntimeError(f"decoder blew up on {BAD}")
        return super().decode_bytes(ids)


def generated(prompt_len: int, n: int) -> str:
    """The model emits SCRIPT[position + 1]: after a prompt of L tokens, SCRIPT[L:L + n]."""
    return bytes(SCRIPT[prompt_len:prompt_len + n]).decode()


@pytest.fixture(scope="module")
def scripted(launch):
    engine = AsyncLLM(ScriptedModel(SCRIPT), tokenizer=FaultyTokenizer(), block_size=4, kv_cache_tokens=2048)
    app = create_app(engine, max_n=2, served_model_name="scripted")
    url, stop = launch(app)
    yield url, app, engine
    stop()
    asyncio.run(engine.shutdown())


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def sse_events(lines) -> list:
    """Every `data:` line as JSON (a torn frame fails here), [DONE] as the string."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"not an SSE line: {line!r}"
    return events


GREEDY = {"temperature": 0, "ignore_eos": True}


async def _post(client, body):
    r = await client.post(COMP, json=body)
    return r.status_code, r.json()


async def _stream(client, body):
    async with client.stream("POST", COMP, json={**body, "stream": True}) as r:
        return r.status_code, sse_events([line async for line in r.aiter_lines()])


def test_an_engine_fault_fails_its_request_alone(scripted):
    url, _, _ = scripted
    before = scrape(url)
    bad = {"prompt": "abcdefg", "max_tokens": 20, **GREEDY}         # reaches BAD at its 10th token
    good = {"prompt": "x", "max_tokens": 15, **GREEDY}             # stops one token short of it

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(_post(c, bad), _stream(c, bad), *[_post(c, good) for _ in range(4)],
                                        _stream(c, good))

    (s_bad, body_bad), (s_stream, events), *goods, (s_good_stream, good_events) = asyncio.run(main())
    assert s_bad == 500
    err = body_bad["error"]
    assert err["type"] == "server_error" and err["code"] == "generation_failed"
    assert err["message"] == ("generation failed (RuntimeError: decoder blew up on 200); other requests are "
                              "unaffected")
    # The stream had started: its tokens, then the error as an event, then [DONE].
    assert s_stream == 200 and events[-1] == "[DONE]" and events[-2]["error"] == err
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == generated(7, 9)
    for status, body in goods:
        assert status == 200 and body["choices"][0]["text"] == generated(1, 15)
    assert s_good_stream == 200 and "error" not in json.dumps(good_events)
    after = scrape(url)
    delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    assert delta('lmstack_requests_total{endpoint="/v1/completions",status="500"}') == 1
    assert delta('lmstack_requests_total{endpoint="/v1/completions",status="200"}') == 6
    assert delta('lmstack_stream_errors_total{endpoint="/v1/completions"}') == 1
    assert delta("lmstack_requests_aborted_total") == 0           # a failure is not a departed client


def test_an_exception_out_of_the_engine_fails_its_request_alone(scripted, monkeypatch):
    """Not the engine's error field: its stream raising (e.g. a failed forward)."""
    url, _, engine = scripted
    real = engine.generate

    async def generate(prompt, params=None, request_id=None):
        k = 0
        async for out in real(prompt, params, request_id):
            if params.seed == 13 and k == 2:
                raise MemoryError("injected")
            k += 1
            yield out

    monkeypatch.setattr(engine, "generate", generate)
    doomed = {"prompt": "x", "max_tokens": 7, "seed": 13, **GREEDY}
    fine = {"prompt": "x", "max_tokens": 7, "seed": 1, **GREEDY}

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(_post(c, doomed), _stream(c, doomed), _post(c, fine), _stream(c, fine))

    (s1, b1), (s2, e2), (s3, b3), (s4, e4) = asyncio.run(main())
    assert s1 == 500 and b1["error"]["message"].startswith("generation failed (MemoryError: injected)")
    assert s2 == 200 and e2[-2]["error"]["code"] == "generation_failed" and e2[-1] == "[DONE]"
    assert s3 == 200 and b3["choices"][0]["text"] == generated(1, 7)
    assert "".join(e["choices"][0]["text"] for e in e4[:-1]) == generated(1, 7)
    deadline = time.monotonic() + 10
    while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.engine.has_unfinished_requests()          # the failed ones were aborted, not leaked


def test_line_separators_in_generated_text_survive_iter_lines(scripted):
    url, _, _ = scripted
    want = generated(1, 15)
    assert "\u2028" in want and "\u0085" in want and "\u2029" in want
    body = {"prompt": "x", "max_tokens": 15, "stream": True, **GREEDY}
    with httpx.stream("POST", url + COMP, json=body) as r:
        raw = b"".join(r.iter_raw())
    assert "\u2028".encode() not in raw and "\u0085".encode() not in raw      # escaped on the wire
    events = sse_events(httpx.Response(200, content=raw).iter_lines())        # what clients split on
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want
    echo = {"prompt": SEPARATORS, "max_tokens": 1, "echo": True, "stream": True, **GREEDY}
    with httpx.stream("POST", url + COMP, json=echo) as r:
        events = sse_events(r.iter_lines())
    assert events[0]["choices"][0]["text"] == SEPARATORS                       # the echoed prompt too


def test_sse_encoder_escapes_line_separators():
    frame = sse({"text": "a\u2028b\u0085c\u2029d\n\ud800"})
    assert frame == b'data: {"text":"a\\u2028b\\u0085c\\u2029d\\n\\ud800"}\n\n'
    assert json.loads(frame[6:]) == {"text": "a\u2028b\u0085c\u2029d\n\ud800"}
    assert frame.decode().splitlines() == [frame.decode()[:-2], ""]


def test_a_model_without_a_chat_template_says_how_to_give_one(scripted):
    url, _, _ = scripted
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "no_chat_template" and err["param"] == "messages"
    assert "--chat-template FILE" in err["message"]


def test_a_failing_prompt_of_a_batch_ends_its_siblings(scripted):
    url, _, engine = scripted
    before = scrape(url)
    # "abcdefg" meets BAD at its 10th token, "x" only at its 16th: the failure must abort "x".
    r = httpx.post(url + COMP, json={"prompt": ["abcdefg", "x"], "max_tokens": 40, **GREEDY}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    deadline = time.monotonic() + 10          # the abort reaches the engine thread before its next step
    while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.engine.has_unfinished_requests()
    engine.engine.block_manager.check_no_leaks()
    assert scrape(url).get("lmstack_requests_aborted_total") == before.get("lmstack_requests_aborted_total")
