"""Scoring over HTTP: our own server started in-process (generation through the completions
and chat APIs equals local generation; its echo + logprobs make multiple choice score as
locally), a stand-in OpenAI server that does echo log-probs (its
log-likelihoods equal local ones), and endpoints that are down or answer garbage."""
from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lmstack.eval import EndpointModel, Failure, LocalModel, evaluate, load_task
from lmstack.infer import LLM, SamplingParams
from lmstack.utils import LmstackError

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from tests.serve.conftest import build_run_dir, free_port, start_server  # noqa: E402

PAIRS = [("the cat sat on", " the mat."), ("the quick brown", " fox jumps"), ("Alice counted:", " one, two"),
         ("Bob said hello ", "to the world")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lmstack.model import Transformer
    from lmstack.serve.app import create_app

    run_dir = build_run_dir(tmp_path_factory.mktemp("eval_serve_run"))
    # a livelier random model (init_std 0.3) than the default, so greedy answers vary
    cfg = Transformer.from_pretrained(run_dir).config
    torch.manual_seed(1)
    Transformer(dataclasses.replace(cfg, init_std=0.3)).save_pretrained(run_dir)
    url, stop = start_server(create_app(str(run_dir), engine_kwargs={"kv_cache_tokens": 8192}))
    yield url, run_dir
    stop()


def write_task(tmp_path, kind="generate_until", **over):
    recs = [{"prompt": "Once upon a time there was", "answer": "a"}, {"prompt": "The quick brown fox", "answer": "b"},
            {"prompt": "Alice counted: one, two,", "answer": "c"}, {"prompt": "Bob said hello to the", "answer": "d"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    spec = {"name": "t", "version": 1, "kind": kind, "source": {"jsonl": "d.jsonl"}, "template": "{prompt}",
            "target": "{answer}", "generation": {"max_tokens": 8, "stop": ["\n"]}, **over}
    (tmp_path / "t.yaml").write_text(json.dumps(spec))
    return load_task(str(tmp_path / "t.yaml"))


@pytest.mark.parametrize("chat", [False, True])
def test_generation_through_our_server_equals_local(served, tmp_path, chat):
    url, run_dir = served
    spec = write_task(tmp_path, chat=chat)
    remote = evaluate(EndpointModel(url), [spec])["tasks"][0]
    local = evaluate(LocalModel(str(run_dir)), [spec])["tasks"][0]
    assert remote["n_failed"] == 0
    outputs = [s["output"] for s in remote["samples"]]
    assert outputs == [s["output"] for s in local["samples"]] and len(set(outputs)) > 1


def test_multiple_choice_through_our_server_equals_local(served, tmp_path):
    """Our server answers echo + logprobs (prompt log-probs), so multiple choice scores over HTTP
    as it does locally: the same per-pair log-likelihoods and the same accuracy."""
    url, run_dir = served
    remote_ll = EndpointModel(url).loglikelihood(PAIRS)
    local_ll = LocalModel(str(run_dir)).loglikelihood(PAIRS)
    for (r, rg), (l, lg) in zip(remote_ll, local_ll):
        assert abs(r - l) < 1e-4 and rg == lg
    mc = write_task(tmp_path, kind="multiple_choice", metrics=["acc"], choices={"distractors": "answer", "n": 2})
    remote = evaluate(EndpointModel(url), [mc])["tasks"][0]
    local = evaluate(LocalModel(str(run_dir)), [mc])["tasks"][0]
    assert remote["n_failed"] == 0 and remote["metrics"] == local["metrics"]
    ppl = evaluate(EndpointModel(url), [write_task(tmp_path, kind="perplexity")])["tasks"][0]
    assert ppl["n_failed"] == 4 and "needs the model's tokenizer" in ppl["failures"][0]["reason"]


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions (echo + logprobs) backed by an lmstack LLM, or garbage."""
    llm: LLM = None
    mode = "ok"
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(json.dumps({"object": "list", "data": [{"id": "fake", "max_model_len": 256}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.mode == "not-json":
            return self._send(b"<html>gateway timeout</html>")
        if self.mode == "no-choices":
            return self._send(json.dumps({"id": "x", "object": "text_completion"}).encode())
        tok = self.llm.tokenizer
        ids = tok.encode(body["prompt"], allowed_special="all")
        with self.lock:
            out = self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1,
                                                          logprobs=1))[0]
        comp = out.outputs[0]
        all_ids = ids + comp.token_ids
        entries = out.prompt_logprobs + comp.logprobs
        lp = {"tokens": [tok.decode([t]) for t in all_ids], "token_logprobs": [], "top_logprobs": [],
              "text_offset": [len(tok.decode(all_ids[:i])) for i in range(len(all_ids))]}
        for t, e in zip(all_ids, entries):
            lp["token_logprobs"].append(None if e is None else e[t].logprob)
            lp["top_logprobs"].append(None if e is None else {tok.decode([k]): v.logprob for k, v in e.items()
                                                               if v.rank == 1 or k == t})
        self._send(json.dumps({"choices": [{"index": 0, "text": tok.decode(all_ids), "logprobs": lp}]}).encode())


@pytest.fixture
def fake(served):
    FakeOpenAI.llm = LLM(str(served[1]), kv_cache_tokens=4096)
    FakeOpenAI.mode = "ok"
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_echo_logprobs_endpoint_equals_local(fake, served):
    remote = EndpointModel(fake).loglikelihood(PAIRS)
    local = LocalModel(str(served[1])).loglikelihood(PAIRS)
    for (a, ga), (b, gb) in zip(remote, local):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_garbage_answers_fail_per_example(fake, tmp_path):
    model = EndpointModel(fake)
    FakeOpenAI.mode = "not-json"
    out = model.generate(["a", "b"])
    assert all(isinstance(x, Failure) and "not JSON" in str(x) for x in out)
    FakeOpenAI.mode = "no-choices"
    out = model.loglikelihood(PAIRS[:2])
    assert all(isinstance(x, Failure) and "not an OpenAI response" in str(x) for x in out)
    r = evaluate(model, [write_task(tmp_path)])["tasks"][0]
    assert r["n_failed"] == 4 and r["metrics"]["exact_match"] == 0.0


def test_endpoint_that_is_down_is_a_clear_error():
    port = free_port()                      # nothing listens there
    with pytest.raises(LmstackError, match=rf"endpoint http://127.0.0.1:{port} is not usable: cannot reach"):
        EndpointModel(f"http://127.0.0.1:{port}/v1", timeout=5)
