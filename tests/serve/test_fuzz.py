"""Schemathesis fuzzes every operation of the server's own OpenAPI spec, with valid and
invalid bodies, against the real server:

- no response may be a 5xx (not_a_server_error);
- a request the spec allows must be accepted (positive_data_acceptance, ST202): the spec
  may not promise more than the server does. The spec is the one the running server
  publishes, with its model's limits (n, max_tokens, token ids) filled in. The one
  refusals exempted (codes SCHEMA_BLIND_CODES) are a prompt too long in tokens (JSON Schema
  counts characters, the model counts tokens) and a chat's tool turns that do not fit
  together (arguments that are not JSON, an answer to no call);
- a request the spec forbids must be refused (negative_data_rejection).

Bounded: a few examples per operation; generation lengths are capped (`_bound`) so that a
valid request costs a handful of decode steps, while types and shapes stay fuzzed."""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, not_a_server_error, positive_data_acceptance

from lmstack.serve.app import create_app
from lmstack.serve.protocol import LIMIT, SCHEMA_BLIND_CODES, publish_limits
from tests.serve.conftest import CONTEXT, MAX_N, train_tokenizer

# The spec the session server publishes (checked below), built before it starts: the
# generic spec (the engine is only built at startup) plus that server's limits.
SPEC = publish_limits(create_app("spec-only").openapi(),
                      {"max_n": MAX_N, "token_id": train_tokenizer().n_vocab - 1, "max_tokens": CONTEXT - 1,
                       "retrieval": {"enum": [False, None]}})      # (a server without an index)
schema = schemathesis.openapi.from_dict(SPEC)


def _bound(body):
    """Keep valid generation requests short: cap max_tokens / n, default max_tokens. Only
    values the spec allows are lowered, so a request stays as valid or invalid as it was."""
    if not isinstance(body, dict):
        return
    for key, cap, top in (("max_tokens", 4, CONTEXT - 1), ("max_completion_tokens", 4, CONTEXT - 1),
                          ("n", 2, MAX_N)):
        v = body.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and cap < v <= top and float(v).is_integer():
            body[key] = cap
    if ("prompt" in body or "messages" in body) and "max_tokens" not in body \
            and "max_completion_tokens" not in body:
        body["max_tokens"] = 4


def _counts_tokens(response) -> bool:
    try:
        return response.json()["error"]["code"] in SCHEMA_BLIND_CODES
    except (ValueError, KeyError, TypeError):
        return False


def accepts_what_the_spec_allows(ctx, response, case):
    if response.status_code == 400 and _counts_tokens(response):
        return None
    return positive_data_acceptance(ctx, response, case)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_spec_and_server_agree(case, server):
    _bound(case.body)
    case.call_and_validate(base_url=server.url, timeout=30, checks=[
        not_a_server_error, accepts_what_the_spec_allows, negative_data_rejection])


def test_served_spec_carries_the_model_limits(server):
    generic = json.dumps(create_app("spec-only").openapi())
    served = httpx.get(server.url + "/openapi.json").json()
    assert served == SPEC                                   # what the fuzzer above was given
    schemas = served["components"]["schemas"]
    limits = server.state.limits
    assert LIMIT in generic and LIMIT not in json.dumps(served)
    assert schemas["CompletionRequest"]["properties"]["n"]["maximum"] == limits.max_n == 4
    assert schemas["ChatCompletionRequest"]["properties"]["max_completion_tokens"]["anyOf"][0] == \
        {"type": "integer", "minimum": 1, "maximum": limits.context_length - 1}
    token_lists = [b for b in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
                   if b["type"] == "array" and b["items"].get("type") == "integer"]
    assert token_lists[0]["items"] == {"type": "integer", "minimum": 0, "maximum": limits.n_vocab - 1}
    # The largest token id the spec allows is accepted; one more is refused.
    top = limits.n_vocab - 1
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": [top], "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    assert httpx.post(server.url + "/v1/completions", json={"prompt": [top + 1], "max_tokens": 1}).status_code == 400
