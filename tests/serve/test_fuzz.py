"""Schemathesis fuzzes every operation of the server's own OpenAPI spec, with valid and
invalid bodies, against the real server: no response may be a 5xx.

Bounded: a few examples per operation; generation lengths are capped (`_bound`) so that a
valid request costs a handful of decode steps, while types and shapes stay fuzzed."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from lmstack.serve.app import create_app

# The spec does not depend on the model (the engine is only built at startup).
schema = schemathesis.openapi.from_dict(create_app("spec-only").openapi())


def _bound(body):
    """Keep valid generation requests short: cap integer max_tokens / n, default max_tokens."""
    if not isinstance(body, dict):
        return
    for key, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > cap:
            body[key] = cap
    if ("prompt" in body or "messages" in body) and "max_tokens" not in body \
            and "max_completion_tokens" not in body:
        body["max_tokens"] = 4


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, server):
    _bound(case.body)
    case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=30)
