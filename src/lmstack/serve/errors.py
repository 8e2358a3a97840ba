"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the client can cause is a 4xx with a one-line message that names the field
and what would be valid. FastAPI's own 422 validation dump is converted to a 400 here,
and anything unexpected becomes a 500 with a short message (the traceback goes to the
server log, not to the client).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmstack.serve")

# HTTP status -> OpenAI error `type`.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Raise anywhere in a handler to answer with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _loc_to_param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union branch names dropped."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and ("[" in item or item in ("str", "int", "list", "function-after")
                                        or item.startswith(("list[", "function-"))):
            continue  # pydantic names the union member it tried; users never wrote that
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line for the first problem, in terms of the request's own field names."""
    if not errors:
        return "invalid request", None
    # Prefer a message from our own validators ("value_error") over union-member noise.
    # Otherwise the deepest location: of a union's members, the one that matched furthest.
    first = next((e for e in errors if e.get("type") == "value_error"), None)
    if first is None:
        first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON; send a JSON object", None
    if first.get("type") == "missing":
        return f"missing required field '{param}'", param
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"'{param}'" if param else "request body"
    if first.get("type") == "model_attributes_type":
        return "request body must be a JSON object sent with Content-Type: application/json", param
    return f"invalid value for {where}: {msg}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint {request.url.path}; the API is described at /openapi.json"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}; the API is described at /openapi.json"
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body could not be parsed: it must be UTF-8 encoded JSON"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}; see the server log")
