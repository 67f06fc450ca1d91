"""The route handlers, grouped by subject; each group's `router()` adds its routes in the order they are served."""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, HTTPException, Path
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..data import DataError, validate_items
from .common import PERSONAL_FIELD, personal, usage
from .context import Served
from .engine import GenRequest
from .schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, HistoryRequest


class GenerationRoutes:
    """OpenAI-compatible completions and chat, and the task-shaped /v1/generate."""

    def __init__(self, s: Served):
        self.s = s

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/completions", self.completions, methods=["POST"],
                        summary="OpenAI-compatible completion (greedy); `user` selects the personal shift")
        r.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"],
                        summary="OpenAI-compatible chat completion (greedy); `user` selects the personal shift")
        r.add_api_route("/v1/generate", self.generate, methods=["POST"],
                        summary="A task query answered as `perfit predict` / PerFitModel.generate answer it")
        return r

    async def completions(self, req: CompletionRequest):
        s = self.s
        s.check_model(req.model)
        n_new = s.max_new(req)
        user = req.user or ""
        greq = GenRequest(user, s.raw_ids(req.prompt, n_new), n_new, task=False, stop=req.stop or [])
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            return {"id": cid, "object": "text_completion", "created": created, "model": s.sc.served_model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return s.stream(greq, chunk, bool((req.stream_options or {}).get("include_usage")))
        res = await s.run(greq)
        body = chunk(res["text"], res["finish_reason"]) | {"usage": usage(res)}
        body[PERSONAL_FIELD] = personal(user, res)
        return body

    async def chat_completions(self, req: ChatCompletionRequest):
        s = self.s
        s.check_model(req.model)
        n_new = s.max_new(req, "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        user = req.user or ""
        greq = GenRequest(user, s.chat_ids(req, n_new), n_new, task=False, stop=req.stop or [])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.sc.served_model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return s.stream(greq, chunk, bool((req.stream_options or {}).get("include_usage")), opening={"role": "assistant"})
        res = await s.run(greq)
        return {"id": cid, "object": "chat.completion", "created": created, "model": s.sc.served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]}, "logprobs": None,
                             "finish_reason": res["finish_reason"]}],
                "usage": usage(res), PERSONAL_FIELD: personal(user, res)}

    async def generate(self, req: GenerateRequest):
        s = self.s
        n_new = s.max_new(req, "max_new_tokens", s.pm.task.max_new_tokens)
        # the query prompt as predict builds it, refused (not cut, as predict cuts it) when over the server's limit
        ids = s.raw_ids(s.pm.builder.query_prompt(req.input), n_new, param="input")
        res = await s.run(GenRequest(req.user_id, ids, n_new, task=True))
        return {"user_id": req.user_id, "output": res["text"], "personal_shift": res["personal_shift"],
                "shift_version": res["shift_version"], "finish_reason": res["finish_reason"]}


class UserRoutes:
    """Users' personalization, status and erasure."""

    def __init__(self, s: Served):
        self.s = s

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/users/{user_id}/history", self.post_history, methods=["POST"], status_code=202,
                        summary="Personalize the user on these history items: an instant shift stored before the reply "
                                "(runs with a shift generator), training in the background")
        r.add_api_route("/v1/users/{user_id}", self.get_user, methods=["GET"],
                        summary="none, queued, training, ready or failed; when trained, on how many items, its loss")
        r.add_api_route("/v1/users/{user_id}", self.delete_user, methods=["DELETE"],
                        summary="Erase the user's shift and everything stored about the user")
        return r

    async def post_history(self, req: HistoryRequest, user_id: str = Path(max_length=200)):
        s = self.s
        s.user_path(user_id)
        if len(req.items) > s.sc.max_history_items:
            raise HTTPException(400, f"items: {len(req.items)} history items; at most {s.sc.max_history_items} per request")
        problems = validate_items(req.items, f"user {user_id!r}", s.pm.task)
        if problems:
            raise DataError(problems)
        return await asyncio.to_thread(s.engine.personalize, user_id, req.items)  # committed to the store first

    async def get_user(self, user_id: str = Path(max_length=200)):
        return await asyncio.to_thread(self.s.engine.user_status, self.s.user_path(user_id))

    async def delete_user(self, user_id: str = Path(max_length=200)):
        self.s.user_path(user_id)
        return {"user_id": user_id, "deleted": await asyncio.wrap_future(self.s.engine.forget(user_id))}


class StatusRoutes:
    """The served model, health and Prometheus metrics."""

    def __init__(self, s: Served):
        self.s = s

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/models", self.models, methods=["GET"], summary="The served model (for OpenAI clients)")
        r.add_api_route("/healthz", self.healthz, methods=["GET"],
                        summary="ok (200) while the worker answers; unhealthy (503) with the reason when it cannot go on")
        r.add_api_route("/metrics", self.prometheus, methods=["GET"])
        return r

    async def models(self):
        return {"object": "list", "data": [{"id": self.s.sc.served_model_name, "object": "model",
                                            "created": int(self.s.started), "owned_by": "perfit"}]}

    async def healthz(self):
        s = self.s
        h = s.engine.health()  # no filesystem paths: this endpoint needs no key
        # the store's counts read the file: off the event loop, which every other request needs
        stored, training = await asyncio.to_thread(lambda: (len(s.pm.store), s.engine.training_queue()))
        body = h | {"task": s.pm.task.name, "model": s.pm.info.name, "device": str(s.pm.device), "users_stored": stored,
                    "queue_depth": s.engine.queue_depth(), "training_queue": training,
                    "uptime_s": round(time.time() - s.started, 1)}
        return JSONResponse(body, status_code=200 if h["status"] == "ok" else 503)

    async def prometheus(self):
        self.s.metrics.cached_users.set(self.s.pm.cached_users)
        return PlainTextResponse(generate_latest(self.s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def routers(s: Served) -> list[APIRouter]:
    """Every route, in the order the app has always registered them."""
    return [GenerationRoutes(s).router(), UserRoutes(s).router(), StatusRoutes(s).router()]
