"""Bad input gets a 4xx in OpenAI's error shape (never a 500 or a raw 422), the server keeps
serving, the API key is enforced, and a client that leaves mid-stream frees its KV blocks."""
from __future__ import annotations

import json
import time

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

# (path, raw body, expected status, expected `param` or None)
CASES = [
    (COMP, b'{"prompt": "hi"', 400, None),                                 # malformed JSON
    (COMP, b'{"prompt": "\xff\xfe hi"}', 400, None),                       # invalid UTF-8 bytes
    (COMP, b'{"prompt": "\\ud800"}', 400, "prompt"),                       # lone surrogate
    (COMP, b'[1, 2]', 400, None),                                          # not an object
    (COMP, b'{}', 400, "prompt"),                                          # missing field
    (COMP, b'{"prompt": 5}', 400, "prompt"),                               # wrong type
    (COMP, b'{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    (COMP, b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    (COMP, b'{"prompt": "hi", "max_tokens": 1e400}', 400, "max_tokens"),
    (COMP, b'{"prompt": "hi", "max_tokens": 99999999999999999999999}', 400, "max_tokens"),
    (COMP, b'{"prompt": "hi", "n": 5}', 400, "n"),                         # above --max-n 4
    (COMP, b'{"prompt": "hi", "n": 0}', 400, "n"),
    (COMP, b'{"prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    (COMP, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    (COMP, b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    (COMP, b'{"prompt": "hi", "logprobs": 21}', 400, "logprobs"),
    (COMP, b'{"prompt": "hi", "stop": ""}', 400, "stop"),
    (COMP, b'{"prompt": "hi", "seed": -1}', 400, "seed"),
    (COMP, b'{"prompt": [99999]}', 400, "prompt"),                         # id outside the vocabulary
    (COMP, b'{"prompt": []}', 400, "prompt"),
    (COMP, b'{"prompt": ""}', 400, "prompt"),
    (COMP, b'{"prompt": "' + b"hello world " * 200 + b'"}', 400, "prompt"),  # longer than the context
    (COMP, b'{"prompt": "hi", "model": "gpt-4"}', 404, "model"),
    (CHAT, b'{"messages": []}', 400, "messages"),                          # empty messages
    (CHAT, b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role"),
    (CHAT, b'{"messages": [{"role": "user"}]}', 400, "messages[0]"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
     "messages[0].content[0].type"),
    (CHAT, b'{"messages": "hi"}', 400, "messages"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}', 400, "top_logprobs"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 500}', 400,
     "max_completion_tokens"),
    ("/v1/internal/attention", b'{"prompt": "' + b"a b " * 100 + b'"}', 400, "prompt"),
    ("/v1/internal/attention", b'{}', 400, "prompt"),
    ("/v1/nope", b'{}', 404, None),
]


def assert_openai_error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert err["param"] == param
    return err


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_bad_input_is_a_4xx_in_openai_shape(server, path, body, status, param):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, status, param)


def test_oversized_body_is_413_and_server_keeps_serving(server):
    big = b'{"prompt": "' + b"x" * (70 * 1024) + b'"}'
    r = httpx.post(server.url + COMP, content=big, headers={"content-type": "application/json"})
    assert_openai_error(r, 413)
    ok = httpx.post(server.url + COMP, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_api_key_is_required_when_set(run_dir, launch):
    from lmstack.serve.app import create_app

    url, stop = launch(create_app(str(run_dir), api_key="sk-test", engine_kwargs={"max_num_seqs": 4}))
    try:
        body = {"messages": MSG, "max_tokens": 2}
        assert_openai_error(httpx.post(url + CHAT, json=body), 401)
        assert_openai_error(httpx.post(url + CHAT, json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_openai_error(httpx.get(url + "/v1/models"), 401)
        ok = httpx.post(url + CHAT, json=body, headers={"Authorization": "Bearer sk-test"})
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200          # health stays open
    finally:
        stop()


def _blocks_used(server) -> float:
    return server.metric("lmstack_kv_cache_blocks_used")


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    aborted0 = server.metric("lmstack_requests_aborted_total")
    body = {"prompt": "Once upon a time", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + COMP, json=body) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i >= 6:  # a few tokens in: leave
                    break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("lmstack_requests_aborted_total") > aborted0 and _blocks_used(server) == 0:
            break
        time.sleep(0.05)
    assert server.metric("lmstack_requests_aborted_total") == aborted0 + 1
    assert _blocks_used(server) == 0
    assert server.state.engine.engine.block_manager.num_used_blocks == 0
    assert not server.state.engine.engine.has_unfinished_requests()


def _one_connection(url: str, requests: list[tuple[str, bytes]]) -> list[tuple[int, dict]]:
    """POST each (path, raw body) in turn on ONE keep-alive connection; fails if the server
    closes it in between (http.client would otherwise reconnect silently)."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
    out = []
    try:
        for path, body in requests:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            if not out:
                sock = conn.sock
            assert conn.sock is sock, "the server closed the keep-alive connection"
            r = conn.getresponse()
            data = r.read()
            assert not r.will_close, f"{path}: the server asked to close the connection"
            out.append((r.status, httpx.Response(r.status, content=data).json()))
    finally:
        conn.close()
    return out


def test_lone_surrogate_in_model_is_a_400_and_the_connection_stays_open(server):
    # The raw JSON escape "\ud800": a string Python can hold but UTF-8 cannot encode.
    (status, body), (status2, ok) = _one_connection(server.url, [
        (COMP, b'{"prompt": "hi", "max_tokens": 1, "model": "gpt-\\ud800"}'),
        (COMP, b'{"prompt": "hi", "max_tokens": 1}')])
    assert status == 400 and body["error"]["param"] == "model" and "surrogate" in body["error"]["message"]
    assert status2 == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length")
    from lmstack.serve.errors import error_body               # and a message quoting one still encodes
    assert error_body(404, "model 'a\ud800' does not exist")["error"]["message"] == "model 'a?' does not exist"


@pytest.mark.parametrize("path,wanted", [(COMP, "the required field 'prompt'"),
                                         (CHAT, "the required field 'messages'"),
                                         ("/v1/internal/tokenize", "one of the fields 'prompt' or 'messages'")])
def test_empty_body_names_what_is_expected(server, path, wanted):
    r = httpx.post(server.url + path, content=b"", headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    assert err["message"] == f"request body is empty; expected a JSON object with {wanted} (see /openapi.json)"


def test_tokenize_is_bounded(server):
    cap = server.app.state.max_tokenize_tokens
    text = "".join(chr(0x4E00 + i % 5000) for i in range(cap))        # rare CJK: >= 1 token per character
    body = json.dumps({"prompt": text}).encode()
    assert len(body) < 64 * 1024                                         # under the body limit: the token cap acts
    err = assert_openai_error(httpx.post(server.url + "/v1/internal/tokenize", content=body,
                                         headers={"content-type": "application/json"}), 400, "prompt")
    assert err["code"] == "too_many_tokens" and f"at most {cap} tokens" in err["message"]
    n = len(server.state.tokenizer.encode(text))
    assert f"has {n} tokens" in err["message"]
    ok = httpx.post(server.url + "/v1/internal/tokenize", json={"prompt": "hello world"})
    assert ok.status_code == 200 and ok.json()["n_tokens"] == len(server.state.tokenizer.encode("hello world"))


def test_tokenize_cap_bounds_the_response(run_dir, launch):
    from lmstack.serve.app import create_app

    url, stop = launch(create_app(str(run_dir), max_tokenize_tokens=50, engine_kwargs={"max_num_seqs": 2}))
    try:
        text = "Once upon a time " * 10
        n = len(httpx.post(url + "/v1/internal/tokenize", json={"prompt": text[:60]}).json()["tokens"])
        assert 0 < n <= 50
        r = httpx.post(url + "/v1/internal/tokenize", json={"prompt": text * 5})
        assert_openai_error(r, 400, "prompt")
        assert len(r.content) < 300
    finally:
        stop()


def test_unexpected_exception_is_a_counted_500_and_keeps_the_connection(server, monkeypatch):
    from lmstack.serve import convert

    def boom(*args, **kwargs):
        raise RuntimeError("injected bug")

    key = 'lmstack_requests_total{endpoint="/v1/completions",status="500"}'
    before = _scrape(server.url).get(key, 0.0)
    monkeypatch.setattr(convert, "sampling_params", boom)
    (status, body), = _one_connection(server.url, [(COMP, b'{"prompt": "hi", "max_tokens": 1}')])
    monkeypatch.undo()
    assert status == 500 and body["error"]["type"] == "server_error"
    assert body["error"]["message"] == "internal error: RuntimeError; see the server log"
    assert _scrape(server.url)[key] == before + 1
    assert httpx.post(server.url + COMP, json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def _scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
