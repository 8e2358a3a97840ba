"""`echo` + `logprobs` on /v1/completions scores the prompt, as lm-eval's OpenAI backend
(`local-completions`) asks it to: echo=True, logprobs=N, max_tokens=1 (or 0), the prompt as
token ids. Checked against a plain forward pass of the same model (log_softmax of its
logits, no engine) and through lm-eval's own response parser."""
from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
import torch

COMP = "/v1/completions"


@pytest.fixture(scope="module")
def reference(run_dir):
    """log p(token_i | tokens_<i) for every i >= 1, from the model's forward pass."""
    from lmstack.model import Transformer

    model = Transformer.from_pretrained(run_dir).eval()

    def score(ids: list[int]) -> list[float]:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0].float()
        lp = torch.log_softmax(logits, -1)
        return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    return score


def test_echo_max_tokens_0_returns_the_prompts_logprobs(server, reference):
    ids = [[5, 17, 42, 99, 3, 250], [7, 8]]
    r = httpx.post(server.url + COMP, json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 0
    for choice, prompt in zip(body["choices"], ids):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(reference(prompt), abs=1e-4)
        for tok, top, value in zip(lp["tokens"][1:], lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
            assert top[tok] == value and len(top) in (2, 3)    # top 2, plus the prompt's token
        assert choice["finish_reason"] == "length"


def test_lm_eval_parser_reads_our_answer(server, reference):
    """lm-eval's request shape and its own parser: sum of the continuation's log-probs."""
    lm_eval_api = pytest.importorskip("lm_eval.models.openai_completions")
    context, continuation = [5, 17, 42], [99, 3]
    payload = lm_eval_api.LocalCompletionsAPI._create_payload(SimpleNamespace(model=None), [context + continuation],
                                                              generate=False)     # lm-eval's own request
    assert payload["echo"] is True and payload["max_tokens"] == 1 and payload["logprobs"] == 1
    r = httpx.post(server.url + COMP, json=payload)
    assert r.status_code == 200, r.text
    [(logprob, _)] = lm_eval_api.LocalCompletionsAPI.parse_logprobs(r.json(), ctxlens=[len(context)])
    # lm-eval slices [ctxlen:-1] of prompt + 1 generated token: exactly the continuation
    assert logprob == pytest.approx(sum(reference(context + continuation)[len(context) - 1:]), abs=1e-4)


def test_streamed_echo_carries_the_same_logprobs(server):
    body = {"prompt": "Once upon a time", "max_tokens": 2, "echo": True, "logprobs": 1, "temperature": 0}
    full = httpx.post(server.url + COMP, json=body).json()["choices"][0]
    events = [json.loads(line[6:]) for line in httpx.post(server.url + COMP, json={**body, "stream": True}).text
              .splitlines() if line.startswith("data: {")]
    pieces = [e["choices"][0] for e in events]
    assert "".join(p["text"] for p in pieces) == full["text"]
    merged = {k: sum((p["logprobs"][k] for p in pieces if p["logprobs"]), []) for k in full["logprobs"]}
    assert merged == full["logprobs"]


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens=0 generates nothing"),
    ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
])
def test_zero_tokens_without_echo_is_refused(server, body, needle):
    r = httpx.post(server.url + COMP, json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]
