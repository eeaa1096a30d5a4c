"""Every error leaves the API as RFC 9457 application/problem+json."""

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import Problem

log = logging.getLogger("consa.service")
MEDIA_TYPE = "application/problem+json"


class ProblemError(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, code: str | None = None, errors: list[dict] | None = None,
                 headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.code, self.errors, self.headers = status, detail, code, errors, headers


def field_error(status: int, loc: list, msg: str, code: str = "validation_error") -> ProblemError:
    """A problem about one request field, shaped like FastAPI's validation errors."""
    return ProblemError(status, f"{'.'.join(map(str, loc))}: {msg}", code=code, errors=[{"loc": loc, "msg": msg}])


def problem_response(request: Request, status: int, detail: str | None, *, code: str | None = None,
                     errors: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, instance=request.url.path,
                   code=code, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, media_type=MEDIA_TYPE, headers=headers)


def responses(*statuses: int) -> dict:
    """OpenAPI `responses=` entries declaring problem documents for these statuses."""
    return {status: {"model": Problem, "content": {MEDIA_TYPE: {}}} for status in statuses}


PROBLEM_RESPONSES = responses(400, 401, 404, 422, 429)

_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
          409: "conflict", 410: "gone", 413: "request_too_large", 416: "range_not_satisfiable"}


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(request, exc.status, exc.detail, code=exc.code, errors=exc.errors, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:
            # FastAPI's own 400: a body it could not parse (invalid UTF-8, JSON nested past the parser's
            # depth). The routes raise ProblemError, never a bare 400.
            return problem_response(request, 400, "the request body is not valid JSON (UTF-8, nested at most "
                                                  "a few hundred levels)", code="malformed_json")
        return problem_response(request, exc.status_code, str(exc.detail), code=_CODES.get(exc.status_code),
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            # Not a validation failure: the body is not JSON at all, a plain bad request.
            return problem_response(request, 400, "the request body is not valid JSON", code="malformed_json",
                                    errors=errors)
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return problem_response(request, 422, detail, code="validation_error", errors=errors)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal server error", code="internal_error")
