"""What the route handlers share: the loaded run, the settings, the engine, and the request checks and answering
paths every generation route goes through."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from ..config import ServeConfig
from ..model import PerFitModel
from .common import PERSONAL_FIELD, Invalid, personal, usage
from .engine import Engine, GenRequest
from .schemas import USER_ID, USER_ID_RULE, ChatCompletionRequest


class Served:
    def __init__(self, pm: PerFitModel, sc: ServeConfig, engine: Engine, metrics):
        self.pm, self.sc, self.engine, self.metrics = pm, sc, engine, metrics
        self.started = time.time()

    def user_path(self, user_id: str) -> str:
        if not USER_ID.match(user_id):
            raise HTTPException(400, f"user id {user_id[:40]!r} is invalid: {USER_ID_RULE}")
        return user_id

    def check_model(self, model: str) -> None:
        if model != self.sc.served_model_name:
            raise HTTPException(404, f"model {model!r} does not exist; this server serves {self.sc.served_model_name!r}")

    def max_new(self, req, field: str = "max_tokens", default: int = 16) -> int:
        n = getattr(req, field, None) or default
        if n > self.sc.max_tokens:
            raise HTTPException(400, f"{field}: {n} is over this server's limit of {self.sc.max_tokens}")
        return n

    def prompt_limit(self, n_new: int) -> int:
        return min(self.sc.max_prompt_tokens, self.pm.cfg.max_length - n_new)

    def raw_ids(self, text: str, n_new: int, add_special: bool = True, param: str = "prompt") -> list[int]:
        ids = self.pm.tok(text, add_special_tokens=add_special)["input_ids"]
        if len(ids) > self.prompt_limit(n_new):
            raise Invalid(f"{param}: the prompt has {len(ids)} tokens; with {n_new} new tokens at most "
                          f"{self.prompt_limit(n_new)} are accepted (--max_prompt_tokens {self.sc.max_prompt_tokens}, "
                          f"the run's max_length {self.pm.cfg.max_length})", param)
        if not ids:
            raise Invalid(f"{param}: the prompt is empty after tokenization", param)
        return ids

    def chat_ids(self, req: ChatCompletionRequest, n_new: int) -> list[int]:
        msgs = [{"role": m.role, "content": m.content} for m in req.messages]
        if getattr(self.pm.tok, "chat_template", None):
            text = self.pm.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return self.raw_ids(text, n_new, add_special=False)
        return self.raw_ids("".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:", n_new)

    async def run(self, greq: GenRequest) -> dict:
        fut = self.engine.generate(greq)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.sc.request_timeout_s or None)
        except asyncio.TimeoutError:  # the future is cancelled with it: a request not yet in a batch is dropped
            raise HTTPException(504, f"no answer within --request_timeout_s {self.sc.request_timeout_s:g}") from None

    def stream(self, greq: GenRequest, chunk, include_usage: bool, opening: dict | None = None) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        greq.on_text = lambda delta: loop.call_soon_threadsafe(q.put_nowait, ("delta", delta))
        fut = self.engine.generate(greq)
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(q.put_nowait, ("done", f)))

        async def events():
            if opening is not None:
                yield f"data: {json.dumps(chunk(opening, None))}\n\n"
            while True:
                kind, v = await q.get()
                if kind == "delta":
                    yield f"data: {json.dumps(chunk({'content': v} if opening is not None else v, None))}\n\n"
                    continue
                if v.exception() is not None:
                    yield f"data: {json.dumps({'error': {'message': str(v.exception()), 'type': 'server_error'}})}\n\n"
                else:
                    res = v.result()
                    last = chunk({} if opening is not None else "", res["finish_reason"])
                    last[PERSONAL_FIELD] = personal(greq.user_id, res)
                    if include_usage:
                        last["usage"] = usage(res)
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                return

        return StreamingResponse(events(), media_type="text/event-stream")
