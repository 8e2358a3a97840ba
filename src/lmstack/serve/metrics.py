"""Server metrics in the Prometheus text exposition format (version 0.0.4), by hand.

Counters and histograms are updated by the request handlers on the event loop (one
thread, so no locks); gauges are read from the engine's `stats()` at scrape time.

    lmstack_requests_total{endpoint,status}      responses sent, by HTTP status (5xx included)
    lmstack_stream_errors_total{endpoint}        streams that began as 200 and ended with an
                                                 SSE error event (generation failed mid-stream)
    lmstack_requests_aborted_total               requests aborted because the client went away
    lmstack_prompt_tokens_total                  prompt tokens processed
    lmstack_generation_tokens_total              tokens generated
    lmstack_time_to_first_token_seconds          histogram, request arrival -> first token
    lmstack_inter_token_latency_seconds          histogram, gap between streamed tokens
    lmstack_e2e_request_latency_seconds          histogram, arrival -> last token
    lmstack_kv_cache_usage_ratio, lmstack_prefix_cache_hit_rate, lmstack_preemptions_total,
    lmstack_num_requests_running / _waiting      from the engine
"""
from __future__ import annotations

import bisect
import math

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


class Counter:
    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, labelnames
        self.values: dict[tuple, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {_fmt(v)}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last slot: above the largest bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bucket i counts values <= buckets[i] (Prometheus `le` is inclusive)
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, c in zip(self.buckets, self.counts):
            cumulative += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_fmt(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


def _first(stats: dict, *keys: str) -> float | None:
    for k in keys:
        v = stats.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def kv_usage(stats: dict) -> float | None:
    """Fraction of KV blocks in use, from whichever of the engine's keys are present."""
    usage = _first(stats, "kv_cache_usage", "kv_usage", "gpu_cache_usage")
    if usage is not None:
        return usage
    used = _first(stats, "kv_blocks_used", "num_used_blocks", "blocks_used", "used_blocks")
    free = _first(stats, "kv_blocks_free", "num_free_blocks", "blocks_free", "free_blocks")
    total = _first(stats, "kv_blocks_total", "num_blocks", "total_blocks", "num_total_blocks")
    if used is not None and total:
        return used / total
    if used is not None and free is not None and used + free > 0:
        return used / (used + free)
    return None


def kv_blocks_used(stats: dict) -> float | None:
    used = _first(stats, "kv_blocks_used", "num_used_blocks", "blocks_used", "used_blocks")
    if used is None:
        free = _first(stats, "kv_blocks_free", "num_free_blocks", "blocks_free", "free_blocks")
        total = _first(stats, "kv_blocks_total", "num_blocks", "total_blocks", "num_total_blocks")
        if free is not None and total is not None:
            used = total - free
    return used


class ServerMetrics:
    def __init__(self):
        self.requests = Counter("lmstack_requests_total", "Requests answered, by endpoint and HTTP status.",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("lmstack_prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter("lmstack_generation_tokens_total", "Tokens generated.")
        self.stream_errors = Counter("lmstack_stream_errors_total",
                                     "Streams answered with status 200 that ended with an SSE error event.",
                                     ("endpoint",))
        self.aborted = Counter("lmstack_requests_aborted_total", "Requests aborted because the client went away.")
        self.ttft = Histogram("lmstack_time_to_first_token_seconds",
                              "Seconds from request arrival to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("lmstack_inter_token_latency_seconds",
                             "Seconds between consecutive generated tokens of one sequence.", ITL_BUCKETS)
        self.e2e = Histogram("lmstack_e2e_request_latency_seconds",
                             "Seconds from request arrival to its last token.", E2E_BUCKETS)

    def render(self, stats: dict | None) -> str:
        lines: list[str] = []
        for m in (self.requests, self.stream_errors, self.prompt_tokens, self.generation_tokens, self.aborted,
                  self.ttft, self.itl, self.e2e):
            lines += m.render()
        stats = stats or {}
        gauges = [
            ("lmstack_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", kv_usage(stats)),
            ("lmstack_kv_cache_blocks_used", "KV-cache blocks in use.", kv_blocks_used(stats)),
            ("lmstack_prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache.",
             _first(stats, "prefix_hit_rate", "prefix_cache_hit_rate")),
            ("lmstack_num_requests_running", "Sequences in the running batch.",
             _first(stats, "num_running", "running")),
            ("lmstack_num_requests_waiting", "Sequences waiting to be scheduled.",
             _first(stats, "num_waiting", "waiting")),
        ]
        for name, help, value in gauges:
            if value is not None:
                lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_fmt(value)}"]
        preempt = _first(stats, "preemptions", "num_preemptions")
        if preempt is not None:
            lines += ["# HELP lmstack_preemptions_total Sequences preempted (recomputed later) by the scheduler.",
                      "# TYPE lmstack_preemptions_total counter", f"lmstack_preemptions_total {_fmt(preempt)}"]
        return "\n".join(lines) + "\n"
