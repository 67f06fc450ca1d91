"""The HTTP face of the engine: OpenAI-compatible completions and chat, the task-shaped /v1/generate, users'
personalization, status and erasure, health and Prometheus metrics. Every bad request gets a 4xx JSON error in
OpenAI's shape ({"error": {"message", "type", "param", "code"}}) and the server keeps serving."""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import __version__
from ..config import ServeConfig
from ..errors import ConfigError
from ..model import PerFitModel
from .auth import api_key_for
from .common import PERSONAL_FIELD, error, personal  # noqa: F401  (PERSONAL_FIELD, personal: still importable from here)
from .context import Served
from .engine import Engine
from .http_errors import add_error_handlers
from .routes import routers

log = logging.getLogger("perfit")
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


class _BodyTooLarge(Exception):
    pass


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


def _auth_and_metrics(api_key: str | None, metrics: Metrics):
    """The HTTP middleware: the API key (but for /healthz), then each response counted and timed by endpoint."""
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

    return auth_and_metrics


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
    served = Served(pm, sc, engine, metrics)
    app.middleware("http")(_auth_and_metrics(api_key, metrics))
    add_error_handlers(app)
    for router in routers(served):
        app.include_router(router)
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
