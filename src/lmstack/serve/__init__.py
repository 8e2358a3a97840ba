"""Floor 4: the OpenAI-compatible HTTP server and the web dashboard.

    from lmstack.serve import create_app      # FastAPI app around one AsyncLLM
    lmstack serve runs/tiny --port 8000       # the same from the command line

Files: protocol.py (request/response shapes, the published schema), convert.py (requests ->
prompt ids and SamplingParams, outputs -> OpenAI shapes), api.py (/v1 endpoints),
generation.py (one request's engine work: streaming, failures, disconnects), tools.py
(tool calls in and out of chat), production.py (request log, shadow model, A/B split),
dashboard.py (endpoints the page uses), metrics.py (Prometheus text), errors.py (OpenAI
error shape), app.py (wiring), static/ (the dashboard: plain HTML, CSS and JavaScript). Chat templates
(lmstack's own, or a checkpoint's Jinja) live in lmstack.tokenizer.
"""


def create_app(*args, **kwargs):
    """See `lmstack.serve.app.create_app` (imported on use: FastAPI is the `serve` extra)."""
    from lmstack.serve.app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
