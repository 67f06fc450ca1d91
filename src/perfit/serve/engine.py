"""The serving engine: one worker thread owns the model, so generation, training and erasure never run at once on it
and every change to a user is ordered after the requests that came before it.

Each turn of the worker: pending erasures first, then one generation batch (the requests that arrived within
max_wait_ms of the first, up to max_batch_size, answered in one mixed-user pass), then one personalization group (every
user waiting to train, up to user_group_size, trained together). A retrained user keeps its previous shift until the
new one is stored; a failed training leaves it untouched and says why in the user's status.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..model import Completion, PerFitModel

log = logging.getLogger("perfit")


class ShuttingDown(Exception):
    pass


@dataclass
class GenRequest:
    """A generation request inside the engine. `on_text(delta)` streams text as it is decoded (from the worker
    thread); `stop` strings end the answer where they first appear (they are not part of it)."""
    user_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    task: bool
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False
    text: str = ""


class Engine:
    def __init__(self, pm: PerFitModel, max_batch_size: int = 32, max_wait_ms: float = 10.0, metrics=None):
        self.pm, self.max_batch_size, self.max_wait = pm, max_batch_size, max_wait_ms / 1000.0
        self.metrics = metrics
        pm.store  # opened once, here: request threads and the worker must share one in-memory index
        self._cv = threading.Condition()
        self._gen: deque[GenRequest] = deque()
        self._train: dict[str, list[dict]] = {}  # user -> items, waiting to train (a newer post replaces them)
        self._erase: deque[tuple[str, concurrent.futures.Future]] = deque()
        self.status: dict[str, dict] = {}  # queued / training / failed users (ready ones are in the store)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="perfit-engine", daemon=True)

    # ---------------------------------------------------------------- the request side (any thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the job in hand (a store write is never cut), refuse what is still waiting."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:
            for r in self._gen:
                r.future.set_exception(ShuttingDown("the server is shutting down"))
            for _, f in self._erase:
                f.set_exception(ShuttingDown("the server is shutting down"))
            self._gen.clear()
            self._erase.clear()

    def _submit(self, put) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            put()
            self._cv.notify_all()
            self._gauges()

    def generate(self, req: GenRequest) -> concurrent.futures.Future:
        self._submit(lambda: self._gen.append(req))
        return req.future

    def personalize(self, user_id: str, items: list[dict]) -> dict:
        def put():
            self._train[user_id] = items
            self.status[user_id] = {"status": "queued", "items": len(items), "queued_at": time.time()}
        self._submit(put)
        return self.user_status(user_id)

    def forget(self, user_id: str) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(lambda: self._erase.append((user_id, f)))
        return f

    def user_status(self, user_id: str) -> dict:
        """none, queued, training, ready or failed, with what is known (when trained, on how many items, its loss)."""
        st = dict(self.status.get(user_id, {}))
        stored = self.pm.store.entry(user_id) if self.pm.has_user(user_id) else None
        if stored is not None:
            shift = {k: stored.get(k) for k in ("trained_at", "items", "final_loss", "train_seconds")}
            if not st:
                st = {"status": "ready"} | shift
            else:
                st["serving"] = shift  # the previous shift serves until the new one is stored
        return {"user_id": user_id, **(st or {"status": "none"})}

    def queue_depth(self) -> int:
        return len(self._gen)

    # ---------------------------------------------------------------- the worker

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._gen))
            self.metrics.training_queue.set(len(self._train))
            self.metrics.cached_users.set(len(self.pm._cached))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._gen or self._train or self._erase or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    return
            self._erasures()
            self._generation()
            self._training()
            with self._cv:
                self._gauges()

    def _erasures(self) -> None:
        with self._cv:
            jobs = list(self._erase)
            self._erase.clear()
            for uid, _ in jobs:  # a user erased before its queued training ran is not trained at all
                self._train.pop(uid, None)
                self.status.pop(uid, None)
        for uid, f in jobs:
            try:
                f.set_result(self.pm.forget(uid))
            except Exception as e:  # noqa: BLE001 - reported to the request that asked
                f.set_exception(e)

    def _generation(self) -> None:
        with self._cv:
            if not self._gen:
                return
            deadline = time.monotonic() + self.max_wait
            while len(self._gen) < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0 or self._erase:
                    break
                self._cv.wait(left)
            batch = [self._gen.popleft() for _ in range(min(len(self._gen), self.max_batch_size))]
        if not batch:
            return
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        tok = self.pm.tok

        def on_token(req: GenRequest):
            def cb(t: int) -> bool:
                req.tokens.append(t)
                if req.task:
                    return False
                text = tok.decode(req.tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in req.stop if s and s in text), default=-1)
                if cut >= 0:
                    text, req.stopped = text[:cut], True
                if req.on_text is not None and not text.endswith("\ufffd") and len(text) > len(req.sent):
                    delta, req.sent = text[len(req.sent):], text
                    req.on_text(delta)
                req.text = text
                return req.stopped
            return cb

        try:
            results = self.pm.complete([Completion(r.user_id, r.prompt_ids, r.max_new_tokens, r.task,
                                                   on_token(r) if (r.stop or r.on_text or not r.task) else None)
                                        for r in batch])
        except Exception as e:  # noqa: BLE001 - every request of the batch learns why
            log.exception("generation batch failed")
            for r in batch:
                r.future.set_exception(e)
            return
        for r, res in zip(batch, results):
            text = res.text if r.task else r.text
            if not r.task and r.on_text is not None and len(text) > len(r.sent):
                r.on_text(text[len(r.sent):])  # the tail held back while it ended inside a character
            r.future.set_result({"text": text, "finish_reason": "stop" if r.stopped else res.finish_reason,
                                 "personal_shift": res.personal_shift, "prompt_tokens": len(r.prompt_ids),
                                 "completion_tokens": len(res.tokens)})

    def _training(self) -> None:
        with self._cv:
            if not self._train:
                return
            users = list(self._train)[: self.pm.cfg.user_group_size]
            jobs = {u: self._train.pop(u) for u in users}
            for u in users:
                self.status[u] = self.status.get(u, {}) | {"status": "training", "started_at": time.time()}
        try:
            reports = self.pm.personalize(jobs, desc="serve: personalize")
        except Exception as e:  # noqa: BLE001 - a failed training is a user's status, not a crash
            log.exception("personalization failed for %s", users)
            with self._cv:
                for u in users:
                    if self.status.get(u, {}).get("status") == "training":
                        self.status[u] = {"status": "failed", "error": f"{type(e).__name__}: {e}", "items": len(jobs[u]),
                                          "failed_at": time.time()}
            if self.metrics is not None:
                self.metrics.trainings.labels(outcome="failed").inc(len(users))
            return
        with self._cv:
            for u in users:
                if self.status.get(u, {}).get("status") == "training":  # a newer post may have queued it again
                    self.status.pop(u, None)
        if self.metrics is not None:
            self.metrics.trainings.labels(outcome="ready").inc(len(reports))
