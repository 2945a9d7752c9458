"""One OpenAI-shaped error type and the one mapper from exceptions to it.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}``
with OpenAI's status code. Internal exceptions never leak their text, paths or
tracebacks: a 500 says only that something failed and gives the request id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.responses import JSONResponse

from serve_app.metrics import ERRORS

logger = logging.getLogger("serve_app")

# OpenAI's error `type` for each status it uses.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


class OpenAIError(Exception):
    """An error a client may see, already in OpenAI's terms."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": _utf8(self.message), "type": self.type, "param": _utf8(self.param), "code": self.code}}

    def response(self) -> JSONResponse:
        """The HTTP response; every error response is made here, so it is also counted here."""
        ERRORS.inc(tags={"type": self.type, "status": str(self.status)})
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _utf8(text: str | None) -> str | None:
    """Text a UTF-8 body can carry. Messages quote the client's own values (a
    model id, a field name), and JSON lets a client send lone surrogates,
    which no UTF-8 encoder takes: escaped here, or the error would be a 500."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid_request(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# How long a client should wait before retrying after a storage failure.
STORAGE_RETRY_AFTER_S = 10


def storage_unavailable() -> OpenAIError:
    return OpenAIError(
        503,
        "The image store is unavailable, so no image was kept. Retry the request later, "
        "or ask for response_format=b64_json.",
        code="storage_unavailable",
        headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)},
    )


STAGE_RETRY_AFTER_S = 5


def server_overloaded(what: str) -> OpenAIError:
    """A bounded queue is full: answered at once rather than waited on."""
    return OpenAIError(
        429,
        f"The server is overloaded ({what} is at capacity). Retry after a short wait.",
        type="server_overloaded",
        code="server_overloaded",
        headers={"Retry-After": str(STAGE_RETRY_AFTER_S)},
    )


def rate_limit_exceeded(retry_after_s: int, headers: dict[str, str]) -> OpenAIError:
    """This API key used up its requests or images for the minute."""
    return OpenAIError(
        429,
        f"Rate limit reached for this API key. Retry after {retry_after_s} seconds.",
        type="rate_limit_exceeded",
        code="rate_limit_exceeded",
        headers={**headers, "Retry-After": str(retry_after_s)},
    )


def stage_unavailable(stage: str) -> OpenAIError:
    """A model stage failed twice (e.g. its replica died): tell the client to come back."""
    return OpenAIError(
        503,
        f"The {stage} stage is temporarily unavailable. Retry the request.",
        code="stage_unavailable",
        headers={"Retry-After": str(STAGE_RETRY_AFTER_S)},
    )


def deadline_exceeded(seconds: float) -> OpenAIError:
    # Retrying the same request would most likely time out again.
    return OpenAIError(
        504,
        f"The request did not finish within the server's deadline of {seconds:g} seconds.",
        code="deadline_exceeded",
        headers={"x-should-retry": "false"},
    )


def model_unavailable(model_id: str) -> OpenAIError:
    # The cause (a source URL, a bucket, a path) stays in the server log.
    return OpenAIError(
        503,
        f"The model '{model_id}' is unavailable: its weights could not be loaded. "
        "Use another model from /v1/models; the server log says what is wrong.",
        param="model",
        code="model_unavailable",
    )


MODEL_LOADING_RETRY_AFTER_S = 10


def model_not_ready(model_id: str) -> OpenAIError:
    """The model's stages are starting (or being replaced) and have no replica that can take work yet."""
    return OpenAIError(
        503,
        f"The model '{model_id}' is still loading. Retry after a short wait.",
        param="model",
        code="model_not_ready",
        headers={"Retry-After": str(MODEL_LOADING_RETRY_AFTER_S)},
    )


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or request.headers.get("x-request-id", "")


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'n') -> 'n'; ('body', 'a', 0, 'b') -> 'a[0].b'; a JSON syntax error -> None."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    kind = first.get("type", "")
    if kind == "json_invalid":
        return invalid_request("We could not parse the JSON body of your request. The body must be valid JSON.", None)
    loc = tuple(first.get("loc", ()))
    if kind == "missing" and loc == ("body",):
        return invalid_request("The request body is empty; send a JSON object.", None)
    param = _param_from_loc(loc)
    if kind == "missing":
        return invalid_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if param is None:
        return invalid_request("The request body must be a JSON object.", None)
    msg = first.get("msg", "invalid value")
    value = first.get("input")
    shown = repr(value) if isinstance(value, (int, float, bool, str)) and len(repr(value)) < 80 else "the given value"
    return invalid_request(f"Invalid value for '{param}': {shown}. {msg}.", param, "invalid_value")


def to_openai_error(exc: BaseException, request_id: str = "") -> OpenAIError:
    """Map any exception to the error the client sees."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return OpenAIError(404, "Not found.", code="not_found")
        if exc.status_code == 405:
            return OpenAIError(405, "Method not allowed for this route.", code="method_not_allowed")
        return OpenAIError(exc.status_code, str(exc.detail) if exc.status_code < 500 else "Internal server error.")
    logger.error("unhandled error in request %s", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    suffix = f" (request id {request_id})" if request_id else ""
    return OpenAIError(500, f"The server had an error while processing your request{suffix}.", code="internal_error")


def _allowed_methods(request: Request) -> str:
    """The methods of every route on this path, for the Allow header HTTP
    requires on a 405 (Starlette's names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app) -> None:
    """Route every exception FastAPI can see through :func:`to_openai_error`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = to_openai_error(exc, request_id_of(request))
        if error.status == 405:
            error.headers = {**error.headers, "Allow": _allowed_methods(request)}
        return error.response()

    # Anything else (a plain Exception) is answered by serve_app.middleware.RequestGuard,
    # which sits inside Starlette's outermost error middleware and so also sets x-request-id.
    for exc_type in (OpenAIError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, handle)
