"""Every failure as a JSON error in OpenAI's shape with its status code; the server keeps serving."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import DataError
from .common import Invalid, error
from .engine import EngineDead, Overloaded, ShuttingDown, WorkerError

log = logging.getLogger("perfit")


async def invalid(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    if first.get("type") == "json_invalid":
        return error(400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}" for e in errs[:5])
    return error(400, msgs, loc)


async def http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail))


async def shutting_down(request: Request, exc: ShuttingDown):
    return error(503, str(exc), kind="server_error")


async def dead(request: Request, exc: EngineDead):
    return error(503, str(exc), kind="server_error")


async def worker_error(request: Request, exc: WorkerError):
    return error(500, str(exc), kind="server_error")


async def invalid_field(request: Request, exc: Invalid):
    return error(400, str(exc), exc.param)


async def overloaded(request: Request, exc: Overloaded):
    r = error(429, str(exc), kind="rate_limit_error")
    r.headers["Retry-After"] = str(exc.retry_after)
    return r


async def bug(request: Request, exc: Exception):
    log.error("internal error on %s", request.url.path, exc_info=exc)
    return error(500, f"internal error: {type(exc).__name__}", kind="server_error")


async def bad_items(request: Request, exc: DataError):
    return error(400, "; ".join(exc.problems[:10]), "items")


HANDLERS = ((RequestValidationError, invalid), (StarletteHTTPException, http_error), (ShuttingDown, shutting_down),
            (EngineDead, dead), (WorkerError, worker_error), (Invalid, invalid_field), (Overloaded, overloaded),
            (Exception, bug), (DataError, bad_items))


def add_error_handlers(app: FastAPI) -> None:
    for exc_class, handler in HANDLERS:
        app.add_exception_handler(exc_class, handler)
