"""The HTTP face of the engine: OpenAI-compatible completions and chat, the task-shaped /v1/generate, users'
personalization, status and erasure, health and Prometheus metrics. Every bad request gets a 4xx JSON error in
OpenAI's shape ({"error": {"message", "type", "param", "code"}}) and the server keeps serving."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .. import __version__
from ..config import ServeConfig
from ..data import DataError, validate_items
from ..errors import ConfigError
from ..model import PerFitModel
from .auth import api_key_for
from .engine import Engine, EngineDead, GenRequest, Overloaded, ShuttingDown, WorkerError
from .schemas import USER_ID, USER_ID_RULE, ChatCompletionRequest, CompletionRequest, GenerateRequest, HistoryRequest

log = logging.getLogger("perfit")
PERSONAL_FIELD = "perfit"  # the extra response field: {"user", "personal_shift", "shift_version"}
FATAL_EXIT_CODE = 3  # `perfit serve` exits with it when its worker cannot go on (for a supervisor to restart it)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("perfit_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=r)
        self.latency = Histogram("perfit_request_seconds", "Time to the response (its start, when streamed)", ["endpoint"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.batch_size = Histogram("perfit_batch_size", "Requests answered in one generation batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("perfit_queue_depth", "Generation requests waiting for a batch", registry=r)
        self.training_queue = Gauge("perfit_training_queue", "Users waiting to be personalized", registry=r)
        self.cached_users = Gauge("perfit_cached_users", "Users' shifts held on the device", registry=r)
        self.trainings = Counter("perfit_trainings", "Personalizations by outcome", ["outcome"], registry=r)
        self.generating = Gauge("perfit_generating", "Requests in the generation batch being answered", registry=r)
        self.rejected = Counter("perfit_rejected", "Requests refused with 429 because a queue was full", ["reason"],
                                registry=r)
        self.worker_errors = Counter("perfit_worker_errors", "Jobs of the worker that failed, by phase", ["phase"],
                                     registry=r)


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


class _BodyTooLarge(Exception):
    pass


class _Invalid(Exception):
    """A request field's value the server refuses (400 naming the field)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def personal(user: str, res: dict) -> dict:
    """The `perfit` response field: whose shift answered and which stored version of it (None: the stage-1 shifts)."""
    return {"user": user or None, "personal_shift": res["personal_shift"], "shift_version": res["shift_version"]}


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, whether announced by Content-Length or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return msg

        async def tracking(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracking)
        except _BodyTooLarge:
            if not started:
                await error(413, f"request body over {self.limit} bytes")(scope, receive, send)


def create_app(pm: PerFitModel, sc: ServeConfig, api_key: str | None = None, on_fatal=None) -> FastAPI:
    """The app over one loaded run. `on_fatal(reason)` is called once if the engine's worker cannot go on."""
    metrics = Metrics()
    engine = Engine(pm, sc.max_batch_size, sc.max_wait_ms, metrics, max_queued_requests=sc.max_queued_requests,
                    max_queued_users=sc.max_queued_users, max_consecutive_failures=sc.max_consecutive_failures,
                    on_fatal=on_fatal, mode=sc.personalize or None, trainer=sc.trainer,
                    instant_items_per_turn=sc.instant_items_per_turn, trainer_nice=sc.trainer_nice)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="PerFit", version=__version__, lifespan=lifespan,
                  description="Personalized generation: one frozen model, a collective shift and one tiny shift per user.")
    app.state.engine, app.state.metrics = engine, metrics
    started = time.time()

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        if api_key is not None and request.url.path != "/healthz":
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                response = error(401, "missing or wrong API key (Authorization: Bearer <key>)", kind="authentication_error")
                metrics.requests.labels("auth", "401").inc()
                return response
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}" for e in errs[:5])
        return error(400, msgs, loc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, exc: ShuttingDown):
        return error(503, str(exc), kind="server_error")

    @app.exception_handler(EngineDead)
    async def dead(request: Request, exc: EngineDead):
        return error(503, str(exc), kind="server_error")

    @app.exception_handler(WorkerError)
    async def worker_error(request: Request, exc: WorkerError):
        return error(500, str(exc), kind="server_error")

    @app.exception_handler(_Invalid)
    async def invalid_field(request: Request, exc: _Invalid):
        return error(400, str(exc), exc.param)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        r = error(429, str(exc), kind="rate_limit_error")
        r.headers["Retry-After"] = str(exc.retry_after)
        return r

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    @app.exception_handler(DataError)
    async def bad_items(request: Request, exc: DataError):
        return error(400, "; ".join(exc.problems[:10]), "items")

    def user_path(user_id: str) -> str:
        if not USER_ID.match(user_id):
            raise HTTPException(400, f"user id {user_id[:40]!r} is invalid: {USER_ID_RULE}")
        return user_id

    def check_model(model: str) -> None:
        if model != sc.served_model_name:
            raise HTTPException(404, f"model {model!r} does not exist; this server serves {sc.served_model_name!r}")

    def max_new(req, field: str = "max_tokens", default: int = 16) -> int:
        n = getattr(req, field, None) or default
        if n > sc.max_tokens:
            raise HTTPException(400, f"{field}: {n} is over this server's limit of {sc.max_tokens}")
        return n

    def prompt_limit(n_new: int) -> int:
        return min(sc.max_prompt_tokens, pm.cfg.max_length - n_new)

    def raw_ids(text: str, n_new: int, add_special: bool = True, param: str = "prompt") -> list[int]:
        ids = pm.tok(text, add_special_tokens=add_special)["input_ids"]
        if len(ids) > prompt_limit(n_new):
            raise _Invalid(f"{param}: the prompt has {len(ids)} tokens; with {n_new} new tokens at most "
                           f"{prompt_limit(n_new)} are accepted (--max_prompt_tokens {sc.max_prompt_tokens}, the run's "
                           f"max_length {pm.cfg.max_length})", param)
        if not ids:
            raise _Invalid(f"{param}: the prompt is empty after tokenization", param)
        return ids

    def chat_ids(req: ChatCompletionRequest, n_new: int) -> list[int]:
        msgs = [{"role": m.role, "content": m.content} for m in req.messages]
        if getattr(pm.tok, "chat_template", None):
            text = pm.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return raw_ids(text, n_new, add_special=False)
        return raw_ids("".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:", n_new)

    async def run(greq: GenRequest) -> dict:
        fut = engine.generate(greq)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), sc.request_timeout_s or None)
        except asyncio.TimeoutError:  # the future is cancelled with it: a request not yet in a batch is dropped
            raise HTTPException(504, f"no answer within --request_timeout_s {sc.request_timeout_s:g}") from None

    def usage(res: dict) -> dict:
        return {"prompt_tokens": res["prompt_tokens"], "completion_tokens": res["completion_tokens"],
                "total_tokens": res["prompt_tokens"] + res["completion_tokens"]}

    def stream(greq: GenRequest, chunk, include_usage: bool, opening: dict | None = None) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        greq.on_text = lambda delta: loop.call_soon_threadsafe(q.put_nowait, ("delta", delta))
        fut = engine.generate(greq)
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

    @app.post("/v1/completions", summary="OpenAI-compatible completion (greedy); `user` selects the personal shift")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        n_new = max_new(req)
        user = req.user or ""
        greq = GenRequest(user, raw_ids(req.prompt, n_new), n_new, task=False, stop=req.stop or [])
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            return {"id": cid, "object": "text_completion", "created": created, "model": sc.served_model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return stream(greq, chunk, bool((req.stream_options or {}).get("include_usage")))
        res = await run(greq)
        body = chunk(res["text"], res["finish_reason"]) | {"usage": usage(res)}
        body[PERSONAL_FIELD] = personal(user, res)
        return body

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (greedy); `user` selects the personal shift")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        n_new = max_new(req, "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        user = req.user or ""
        greq = GenRequest(user, chat_ids(req, n_new), n_new, task=False, stop=req.stop or [])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": sc.served_model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return stream(greq, chunk, bool((req.stream_options or {}).get("include_usage")), opening={"role": "assistant"})
        res = await run(greq)
        return {"id": cid, "object": "chat.completion", "created": created, "model": sc.served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]}, "logprobs": None,
                             "finish_reason": res["finish_reason"]}],
                "usage": usage(res), PERSONAL_FIELD: personal(user, res)}

    @app.post("/v1/generate", summary="A task query answered as `perfit predict` / PerFitModel.generate answer it")
    async def generate(req: GenerateRequest):
        n_new = max_new(req, "max_new_tokens", pm.task.max_new_tokens)
        # the query prompt as predict builds it, refused (not cut, as predict cuts it) when over the server's limit
        ids = raw_ids(pm.builder.query_prompt(req.input), n_new, param="input")
        res = await run(GenRequest(req.user_id, ids, n_new, task=True))
        return {"user_id": req.user_id, "output": res["text"], "personal_shift": res["personal_shift"],
                "shift_version": res["shift_version"], "finish_reason": res["finish_reason"]}

    @app.post("/v1/users/{user_id}/history", status_code=202,
              summary="Personalize the user on these history items: an instant shift stored before the reply (runs "
                      "with a shift generator), training in the background")
    async def post_history(req: HistoryRequest, user_id: str = Path(max_length=200)):
        user_path(user_id)
        if len(req.items) > sc.max_history_items:
            raise HTTPException(400, f"items: {len(req.items)} history items; at most {sc.max_history_items} per request")
        problems = validate_items(req.items, f"user {user_id!r}", pm.task)
        if problems:
            raise DataError(problems)
        return await asyncio.to_thread(engine.personalize, user_id, req.items)  # committed to the store first

    @app.get("/v1/users/{user_id}", summary="none, queued, training, ready or failed; when trained, on how many items, its loss")
    async def get_user(user_id: str = Path(max_length=200)):
        return await asyncio.to_thread(engine.user_status, user_path(user_id))

    @app.delete("/v1/users/{user_id}", summary="Erase the user's shift and everything stored about the user")
    async def delete_user(user_id: str = Path(max_length=200)):
        user_path(user_id)
        return {"user_id": user_id, "deleted": await asyncio.wrap_future(engine.forget(user_id))}

    @app.get("/v1/models", summary="The served model (for OpenAI clients)")
    async def models():
        return {"object": "list", "data": [{"id": sc.served_model_name, "object": "model", "created": int(started),
                                            "owned_by": "perfit"}]}

    @app.get("/healthz", summary="ok (200) while the worker answers; unhealthy (503) with the reason when it cannot go on")
    async def healthz():
        h = engine.health()  # no filesystem paths: this endpoint needs no key
        # the store's counts read the file: off the event loop, which every other request needs
        stored, training = await asyncio.to_thread(lambda: (len(pm.store), engine.training_queue()))
        body = h | {"task": pm.task.name, "model": pm.info.name, "device": str(pm.device), "users_stored": stored,
                    "queue_depth": engine.queue_depth(), "training_queue": training,
                    "uptime_s": round(time.time() - started, 1)}
        return JSONResponse(body, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        metrics.cached_users.set(pm.cached_users)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return BodyLimit(app, sc.max_body_bytes)


def serve(sc: ServeConfig) -> int:
    """Load the run once and serve it until stopped (SIGINT/SIGTERM: in-flight requests finish first). Returns the
    exit code: 0, or FATAL_EXIT_CODE when the worker could not go on (every waiting request was answered 503)."""
    import uvicorn

    if not sc.run_dir:
        raise ConfigError("--run_dir is required")
    api_key = api_key_for(sc.host, sc.api_key_file)
    pm = PerFitModel.from_run(sc.run_dir, device=sc.device or None, dtype=sc.dtype or None,
                              max_cached_users=sc.max_cached_users)
    fatal: list[str] = []
    holder: dict = {}

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        holder["server"].should_exit = True

    app = create_app(pm, sc, api_key, on_fatal=on_fatal)
    server = holder["server"] = uvicorn.Server(uvicorn.Config(app, host=sc.host, port=sc.port, log_level="info",
                                                              timeout_graceful_shutdown=30))
    if sc.max_lifetime_s > 0:
        timer = threading.Timer(sc.max_lifetime_s, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    log.info("serving %s (%s, %d users stored) on http://%s:%d", sc.run_dir, pm.task.name, len(pm.store), sc.host, sc.port)
    server.run()
    if fatal:
        log.error("perfit serve: exiting with %d: the serving worker cannot go on (%s)", FATAL_EXIT_CODE, fatal[0])
        return FATAL_EXIT_CODE
    return 0
