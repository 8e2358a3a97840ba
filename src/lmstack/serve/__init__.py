"""Floor 4: the OpenAI-compatible HTTP server and the web dashboard.

    from lmstack.serve import create_app      # FastAPI app around one AsyncLLM
    lmstack serve runs/tiny --port 8000       # the same from the command line

Files: protocol.py (request/response shapes), convert.py (requests -> SamplingParams,
outputs -> OpenAI shapes), api.py (/v1 endpoints, streaming), dashboard.py (endpoints the
page uses), metrics.py (Prometheus text), errors.py (OpenAI error shape), app.py (wiring),
static/ (the dashboard: plain HTML, CSS and JavaScript).
"""


def create_app(*args, **kwargs):
    """See `lmstack.serve.app.create_app` (imported on use: FastAPI is the `serve` extra)."""
    from lmstack.serve.app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
