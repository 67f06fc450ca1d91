"""Request bodies (pydantic). The OpenAI-compatible ones accept the subset of OpenAI's fields that greedy decoding can
honour: fields OpenAI defines but this server cannot honour are accepted only at their neutral values, and fields
nobody defines are refused, so a client never silently gets something other than what it asked for."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
USER_ID_RULE = "1 to 128 characters: letters, digits and . _ : @ + -, starting with a letter or digit"


def check_user_id(v: str) -> str:
    if not USER_ID.match(v):
        raise ValueError(f"user id {v[:40]!r} is invalid: {USER_ID_RULE}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _OpenAIBase(_Strict):
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (server limit: --max_tokens).")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy (the only decoding served).")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="Only 1.")
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the answer ends before the first found.")
    user: str | None = Field(None, description="Selects the user's personal shift (none stored: the stage-1 shifts).")
    seed: int | None = None  # greedy decoding is deterministic: any seed gives the same answer
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    logit_bias: dict | None = None
    logprobs: bool | int | None = None

    @field_validator("user")
    @classmethod
    def _user(cls, v):
        return None if v is None else check_user_id(v)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of at most 200 characters")
        return stops

    @model_validator(mode="after")
    def _greedy_only(self):
        if self.temperature not in (None, 0):
            raise ValueError("temperature: only greedy decoding is served (0 or absent)")
        if self.top_p not in (None, 1):
            raise ValueError("top_p: only greedy decoding is served (1 or absent)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        if self.stream_options and set(self.stream_options) - {"include_usage"}:
            raise ValueError("stream_options: only include_usage is supported")
        return self


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str]
    echo: bool | None = Field(None, description="Only false.")
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = Field(None, max_length=0)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        v = [v] if isinstance(v, str) else v
        if len(v) != 1 or not v[0]:
            raise ValueError("prompt: exactly one non-empty prompt per request")
        return v[0]

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)
    name: str | None = None


class ChatCompletionRequest(_OpenAIBase):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)


class GenerateRequest(_Strict):
    user_id: str
    input: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1, description="Default: the task's answer length.")

    @field_validator("user_id")
    @classmethod
    def _user(cls, v):
        return check_user_id(v)


class HistoryRequest(_Strict):
    items: list[dict] = Field(min_length=1, description="History items in the task's format (as in the per-user layout).")
