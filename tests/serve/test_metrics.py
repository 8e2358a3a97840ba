"""/metrics: Prometheus text whose counters and histograms move by exactly what a request did,
and the exposition helpers (cumulative buckets, label escaping) checked on known values."""
from __future__ import annotations

import httpx

from lmstack.serve.metrics import Counter, Histogram, ServerMetrics


def _scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_one_streamed_request(server):
    before = _scrape(server.url)
    body = {"prompt": "Once upon a time", "max_tokens": 7, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usage = httpx.Response(200, content=lines[-1][6:]).json()["usage"]
    after = _scrape(server.url)
    delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    assert usage["completion_tokens"] == 7
    assert delta("lmstack_generation_tokens_total") == 7
    assert delta("lmstack_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta('lmstack_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert delta("lmstack_time_to_first_token_seconds_count") == 1
    assert delta("lmstack_inter_token_latency_seconds_count") == 6       # gaps between 7 tokens
    assert delta("lmstack_e2e_request_latency_seconds_count") == 1
    for gauge in ("lmstack_kv_cache_usage_ratio", "lmstack_prefix_cache_hit_rate", "lmstack_preemptions_total",
                  "lmstack_num_requests_running"):
        assert gauge in after


def test_histogram_and_counter_exposition():
    h = Histogram("x_seconds", "help", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = h.render()
    assert 'x_seconds_bucket{le="0.1"} 2' in lines          # le is inclusive
    assert 'x_seconds_bucket{le="1"} 3' in lines
    assert 'x_seconds_bucket{le="+Inf"} 4' in lines
    assert "x_seconds_sum 3.65" in lines and "x_seconds_count 4" in lines
    c = Counter("y_total", "help", ("path",))
    c.inc(path='a"b\\c')
    assert c.render()[-1] == 'y_total{path="a\\"b\\\\c"} 1'
    text = ServerMetrics().render({"kv_blocks_used": 3, "kv_blocks_total": 12, "num_preemptions": 2})
    assert "lmstack_kv_cache_usage_ratio 0.25" in text and "lmstack_preemptions_total 2" in text
