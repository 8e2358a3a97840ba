"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the client can cause is a 4xx with a one-line message that names the field
and what would be valid. FastAPI's own 422 validation dump is converted to a 400 here,
and anything unexpected becomes a 500 with a short message (the traceback goes to the
server log, not to the client; app.py's gate turns it into a response, so the 500 is
counted and the connection stays open).
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


def _printable(text: str | None) -> str | None:
    """Messages may quote what the client sent; a lone surrogate in it cannot be encoded."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": _printable(message), "type": _TYPES.get(status, "invalid_request_error"),
                      "param": _printable(param), "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _is_union_label(item: str) -> bool:
    """pydantic names the union member it tried ('str', 'list[constrained-int]',
    'function-after[_check_utf8(), str]'); users never wrote that."""
    return "[" in item or item in ("str", "int", "list") or item.startswith(("function-", "constrained-"))


def _loc_to_param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union member names dropped."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and _is_union_label(item):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def _empty_body_message(body_model: type | None) -> str:
    fields = getattr(body_model, "model_fields", {})
    required = [name for name, f in fields.items() if f.is_required()]
    if required:
        wanted = "the required field" + ("s " if len(required) > 1 else " ") + ", ".join(f"'{n}'" for n in required)
    elif getattr(body_model, "one_of", None):
        wanted = "one of the fields " + " or ".join(f"'{n}'" for n in body_model.one_of)
    else:
        wanted = "the endpoint's fields"
    return f"request body is empty; expected a JSON object with {wanted} (see /openapi.json)"


def validation_message(errors: list[dict], body_model: type | None = None) -> tuple[str, str | None]:
    """One line for the first problem, in terms of the request's own field names.
    `body_model`: the endpoint's request model, named when the body is missing."""
    if not errors:
        return "invalid request", None
    # Prefer a message from our own validators ("value_error") over union-member noise.
    # Otherwise the deepest location (of a union's members, the one that matched furthest),
    # and there a broken constraint over "wrong type" from members that never matched.
    first = next((e for e in errors if e.get("type") == "value_error"), None)
    if first is None:
        first = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type", "")).endswith("_type")))
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON; send a JSON object", None
    if first.get("type") == "missing":
        if param is None:   # the body itself is missing
            return _empty_body_message(body_model), None
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
        body_field = getattr(request.scope.get("route"), "body_field", None)
        body_model = getattr(getattr(body_field, "field_info", None), "annotation", None)
        message, param = validation_message(list(exc.errors()), body_model)
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

    # A last resort: app.py's gate answers unexpected exceptions before they get this far.
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}; see the server log")
