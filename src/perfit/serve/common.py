"""What every part of the HTTP face shares: the error body in OpenAI's shape, the `perfit` response field, token usage."""
from __future__ import annotations

from fastapi.responses import JSONResponse

PERSONAL_FIELD = "perfit"  # the extra response field: {"user", "personal_shift", "shift_version"}


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


class Invalid(Exception):
    """A request field's value the server refuses (400 naming the field)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def personal(user: str, res: dict) -> dict:
    """The `perfit` response field: whose shift answered and which stored version of it (None: the stage-1 shifts)."""
    return {"user": user or None, "personal_shift": res["personal_shift"], "shift_version": res["shift_version"]}


def usage(res: dict) -> dict:
    return {"prompt_tokens": res["prompt_tokens"], "completion_tokens": res["completion_tokens"],
            "total_tokens": res["prompt_tokens"] + res["completion_tokens"]}
