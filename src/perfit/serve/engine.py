"""The serving engine: one worker thread owns the model, so generation, training and erasure never run at once on it.

Each turn of the worker: pending erasures first (once DELETE is received nothing more is answered with the erased
shift), then the instant shifts of the users posted since the last turn (runs with a shift generator: one pass, stored
before their posts return), then one generation batch (the requests that arrived within max_wait_ms of the first, up to
max_batch_size, answered in one mixed-user pass, each user's shift read from the store once for the batch), then, with
the inline trainer, one personalization group (users waiting to train, up to user_group_size, trained together: every
request waits for it). The process trainer (`serve.trainer`) trains beside the worker instead, at the lowest CPU
priority, and hands shifts over through the store; the worker restarts it if it dies.

What it promises:
- Durable jobs: an accepted history is queued in the run's store before `personalize` returns; a restarted engine
  resumes what was queued or interrupted, and a job erased or replaced meanwhile is not stored (UserStore.put_many).
- Supervision: an error fails only the requests of the job it happened in (a batch, a request's own stream, a
  training group, an erasure); the worker goes on. An error outside any job, or max_consecutive_failures failed
  batches in a row, is fatal: every waiting request fails with EngineDead, health says why and `on_fatal` is called
  (the server then exits non-zero, for its supervisor to restart it). No request waits on a dead worker.
- Backpressure: at most max_queued_requests generation requests and max_queued_users training users wait; beyond,
  Overloaded (the server answers 429 with Retry-After).
"""
from __future__ import annotations

import concurrent.futures
import logging
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..faults import fault_point
from ..model import Completion, PerFitModel
from ..store import history_digest

log = logging.getLogger("perfit")
TRAINER_CHECK_S = 5.0  # how often an idle worker checks that the trainer process is alive


class ShuttingDown(Exception):
    """The server is stopping: the request was not taken (503)."""


class EngineDead(Exception):
    """The worker cannot go on (503); the process is about to exit."""


class WorkerError(Exception):
    """A job of the worker failed (500); the message names the error."""


class Overloaded(Exception):
    """A queue is full (429)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


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
    error: BaseException | None = None  # raised by this request's own callback: it fails alone


@dataclass
class InstantJob:
    """A posted history whose generated shift is being made: its examples' features come a slice per worker turn."""
    user_id: str
    job: str
    items: int
    examples: list
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    feats: list = field(default_factory=list)  # feature rows computed so far, in order
    seconds: float = 0.0


def _settle(fut: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a future unless its request gave up on it (cancelled: a timed-out or gone client, a shutdown)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Engine:
    """`mode`: how a posted history becomes a shift (train, instant, instant+train; default: the run's). `trainer`:
    where training runs: inline (in the worker's turns, after each generation batch: a group stalls generation) or
    process (a niced trainer process beside it, `serve.trainer`: generation never waits for training). With a generator
    (instant modes) the user's generated shift is stored before `personalize` returns."""

    def __init__(self, pm: PerFitModel, max_batch_size: int = 32, max_wait_ms: float = 10.0, metrics=None,
                 max_queued_requests: int = 256, max_queued_users: int = 1024, max_consecutive_failures: int = 3,
                 on_fatal: Callable[[str], None] | None = None, mode: str | None = None, trainer: str = "inline",
                 instant_items_per_turn: int = 8, trainer_nice: int = 19):
        self.pm, self.max_batch_size, self.max_wait = pm, max_batch_size, max_wait_ms / 1000.0
        self.mode = mode or pm.cfg.personalize
        if self.mode != "train":
            pm._require_generator()
        if trainer not in ("inline", "process"):
            raise ValueError(f"trainer {trainer!r}: choose from inline, process")
        self.trainer = trainer
        self._proc: subprocess.Popen | None = None
        self._instant: deque[InstantJob] = deque()
        self.instant_items_per_turn, self.trainer_nice = instant_items_per_turn, trainer_nice
        self.metrics = metrics
        self.max_queued_requests, self.max_queued_users = max_queued_requests, max_queued_users
        self.max_consecutive_failures = max_consecutive_failures
        self.on_fatal = on_fatal
        self.on_batch: Callable[[list[GenRequest]], None] | None = None  # sees each batch's requests (tests, tracing)
        pm.writable_store()  # opened (made if new) once, here: request threads and the worker share one in-memory index
        self._cv = threading.Condition()
        self._gen: deque[GenRequest] = deque()
        self._train: OrderedDict[str, str] = OrderedDict()  # user -> job id waiting to train (the items are in the store)
        self._erase: deque[tuple[str, concurrent.futures.Future]] = deque()
        self._stopping = False
        self._started = False
        self.fatal: str | None = None
        self._failed_batches = 0
        self.generating = 0  # requests of the batch being answered
        self._thread = threading.Thread(target=self._loop, name="perfit-engine", daemon=True)

    # ---------------------------------------------------------------- the request side (any thread)

    def start(self) -> None:
        """Resume the jobs the store holds (accepted before a restart, or interrupted in training), then serve."""
        pending = self.pm.store.pending_jobs()
        if self.mode == "instant":  # accepted, not yet generated: generated on the first turn
            for user, job in pending:
                items = self.pm.store.job_items(user)
                if items is not None:
                    self._instant.append(InstantJob(user, job, len(items), self.pm.personal_examples(user, items)))
        elif self.trainer == "inline":
            for user, job in pending:
                self._train[user] = job
        if pending:
            log.info("resuming %d personalization jobs accepted before this server started", len(pending))
            if self.mode != "instant":
                self._ensure_trainer()
        self._started = True
        self._thread.start()

    def _ensure_trainer(self) -> None:
        """The trainer process (trainer=process), started on first need and again if it died."""
        if self.trainer != "process" or self._stopping:
            return
        with self._cv:
            if self._proc is not None and self._proc.poll() is None:
                return
            if self._proc is not None:
                log.warning("the trainer process exited with %s; starting another", self._proc.returncode)
            dtype = str(next(self.pm.model.parameters()).dtype).removeprefix("torch.")
            self._proc = subprocess.Popen([sys.executable, "-m", "perfit.serve.trainer", "--run_dir", self.pm.run_dir,
                                           "--mode", "train" if self.mode == "train" else "instant+train",
                                           "--device", str(self.pm.device), "--dtype", dtype,
                                           "--nice", str(self.trainer_nice)])

    def _trainer_died(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None and not self._stopping

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the job in hand (a store write is never cut), refuse what is still waiting. Queued personalization
        jobs stay in the store for the next start."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._fail_waiting(ShuttingDown("the server is shutting down"))
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # it finishes the group in hand (a store write is never cut)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def health(self) -> dict:
        if self.fatal is not None:
            return {"status": "unhealthy", "reason": self.fatal}
        if self._started and not self._thread.is_alive() and not self._stopping:
            return {"status": "unhealthy", "reason": "the serving worker is not running"}
        return {"status": "ok"}

    def _admit(self) -> None:
        if self.fatal is not None:
            raise EngineDead(f"the serving worker cannot go on: {self.fatal}")
        if self._stopping:
            raise ShuttingDown("the server is shutting down")

    def generate(self, req: GenRequest) -> concurrent.futures.Future:
        with self._cv:
            self._admit()
            if len(self._gen) >= self.max_queued_requests:
                self._rejected("generation_queue_full")
                raise Overloaded(f"the generation queue is full ({self.max_queued_requests} requests waiting, "
                                 f"--max_queued_requests); retry later")
            self._gen.append(req)
            self._cv.notify_all()
            self._gauges()
        return req.future

    def personalize(self, user_id: str, items: list[dict], timeout: float | None = None) -> dict:
        """Queue a (re)training of the user on `items`: written to the run's store (one transaction) before this
        returns, so that a 202 survives a crash; a newer post for the same user replaces a job still waiting. In the
        instant modes the generated shift is stored before this returns (the worker makes it, between batches);
        with instant+train the job stays queued to refine it."""
        with self._cv:
            self._admit()
            waiting = user_id in self._train or (self.trainer == "process" and self.mode != "instant"
                                                 and self.pm.store.job_items(user_id) is not None)
            if not waiting and self.training_queue() >= self.max_queued_users:  # a waiting user may post again
                self._rejected("training_queue_full")
                raise Overloaded(f"the training queue is full ({self.max_queued_users} users waiting, "
                                 f"--max_queued_users); retry later", retry_after=5)
        job = self.pm.store.enqueue(user_id, items)
        if self.mode != "train":
            ij = InstantJob(user_id, job, len(items), self.pm.personal_examples(user_id, items))
            with self._cv:
                self._admit()
                self._instant.append(ij)
                self._cv.notify_all()
            ij.future.result(timeout)
        if self.mode != "instant":
            if self.trainer == "inline":
                with self._cv:
                    self._train[user_id] = job
                    self._train.move_to_end(user_id)
                    self._cv.notify_all()
            else:
                self._ensure_trainer()
        with self._cv:
            self._gauges()
        return self.user_status(user_id)

    def forget(self, user_id: str) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._admit()
            self._erase.append((user_id, f))
            self._cv.notify_all()
        return f

    def user_status(self, user_id: str) -> dict:
        """none, queued, training, ready or failed, with what is known (when trained, on how many items, its loss)."""
        job = self.pm.store.job(user_id)
        try:
            stored = self.pm.store.entry(user_id)
        except KeyError:
            stored = None
        st = {k: v for k, v in (job or {}).items() if k != "job_id"}
        if stored is not None:
            shift = {k: stored.get(k) for k in ("trained_at", "items", "final_loss", "train_seconds")} | {
                "mode": stored.get("mode", "train")}
            if not st:
                st = {"status": "ready"} | shift
            elif stored.get("mode") == "instant" and st.get("status") in ("queued", "training") \
                    and stored.get("history_digest") == self._digest(user_id, job):
                st = {"status": "ready"} | shift | {"refining": st["status"]}  # its instant shift serves meanwhile
            else:
                st["serving"] = shift  # the previous shift serves until the new one is stored
        return {"user_id": user_id, **(st or {"status": "none"})}

    def _digest(self, user_id: str, job: dict | None) -> str | None:
        """The history digest of the user's queued job (what its instant shift was generated from)."""
        items = self.pm.store.job_items(user_id)
        return None if items is None else history_digest(self.pm.personal_examples(user_id, items))

    def queue_depth(self) -> int:
        return len(self._gen)

    def training_queue(self) -> int:
        if self.trainer == "process" and self.mode != "instant":
            return len(self.pm.store.pending_jobs())
        return len(self._train)

    # ---------------------------------------------------------------- the worker

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._gen))
            self.metrics.training_queue.set(len(self._train))
            self.metrics.cached_users.set(self.pm.cached_users)
            self.metrics.generating.set(self.generating)

    def _failed(self, phase: str) -> None:
        if self.metrics is not None:
            self.metrics.worker_errors.labels(phase=phase).inc()

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._gen or self._train or self._erase or self._instant or self._stopping):
                        if not self._cv.wait(TRAINER_CHECK_S) and self._trainer_died():
                            break
                    if self._stopping:
                        return
                if self._trainer_died() and self.pm.store.pending_jobs():
                    self._ensure_trainer()
                fault_point("engine.loop")
                self._erasures()
                self._instant_shifts()
                self._generation()
                self._training()
                with self._cv:
                    self._gauges()
        except BaseException as e:  # noqa: BLE001 - outside any one job: the worker cannot go on
            self._die(f"{type(e).__name__}: {e}")

    def _die(self, reason: str) -> None:
        log.error("the serving worker cannot go on: %s", reason, exc_info=True)
        self.fatal = reason
        self._fail_waiting(EngineDead(f"the serving worker cannot go on: {reason}"))
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _fail_waiting(self, error: Exception) -> None:
        with self._cv:
            waiting = [r.future for r in self._gen] + [f for _, f in self._erase] + [j.future for j in self._instant]
            self._gen.clear()
            self._erase.clear()
            self._instant.clear()
        for f in waiting:
            _settle(f, error=error)

    def _erasures(self) -> None:
        with self._cv:
            jobs = list(self._erase)
            self._erase.clear()
            for uid, _ in jobs:  # a user erased before its queued training ran is not trained at all
                self._train.pop(uid, None)
        for uid, f in jobs:
            try:
                fault_point("engine.erase")
                _settle(f, self.pm.forget(uid))
            except Exception as e:  # noqa: BLE001 - reported to the request that asked
                log.exception("erasing user %r failed", uid)
                self._failed("erase")
                _settle(f, error=WorkerError(f"erasing the user failed: {type(e).__name__}: {e}"))

    def _instant_shifts(self) -> None:
        """One slice of the posted histories' instant work: the features of at most instant_items_per_turn history
        examples (oldest post first), so that generation batches run between slices; the users whose every example
        is read get their generated shift, stored (only while the job is current: an erasure or a newer post in
        between wins) before their posts return."""
        with self._cv:
            slices, budget = [], self.instant_items_per_turn
            for j in self._instant:
                if budget <= 0:
                    break
                take = j.examples[len(j.feats): len(j.feats) + budget]
                slices.append((j, take))
                budget -= len(take)
        if not slices:
            return
        try:
            fault_point("engine.instant")
            t0 = time.perf_counter()
            rows = self.pm.history_features([e for _, take in slices for e in take])
            k, spent = 0, time.perf_counter() - t0
            for j, take in slices:
                j.feats += list(rows[k: k + len(take)])
                j.seconds += spent * len(take) / len(rows)  # its share of the slice
                k += len(take)
            done = [j for j, _ in slices if len(j.feats) == len(j.examples)]
            if done:
                t0 = time.perf_counter()
                tensors_of = self.pm.shifts_from_profiles({j.user_id: torch.stack(j.feats).mean(0) for j in done})
                per = (time.perf_counter() - t0) / len(done)
                self.pm.store_generated(tensors_of, {j.user_id: j.examples for j in done},
                                        sum(j.seconds for j in done) / len(done) + per,
                                        {j.user_id: j.job for j in done}, keep_jobs=self.mode != "instant",
                                        items={j.user_id: j.items for j in done})
        except Exception as e:  # noqa: BLE001 - the posts learn why; the jobs stay queued
            log.exception("instant personalization failed for %s", [j.user_id for j, _ in slices])
            self._failed("instant")
            with self._cv:
                for j, _ in slices:
                    if j in self._instant:
                        self._instant.remove(j)
            for j, _ in slices:
                _settle(j.future, error=WorkerError(f"instant personalization failed: {type(e).__name__}: {e}"))
            return
        with self._cv:
            for j in done:
                self._instant.remove(j)
        if self.metrics is not None and done:
            self.metrics.trainings.labels(outcome="instant").inc(len(done))
        for j in done:
            _settle(j.future, True)

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
            taken = [self._gen.popleft() for _ in range(min(len(self._gen), self.max_batch_size))]
            # a request whose client gave up before its batch started is dropped; the others can no longer be cancelled
            batch = [r for r in taken if r.future.set_running_or_notify_cancel()]
            self.generating = len(batch)
            self._gauges()
        if not batch:
            return
        if self.on_batch is not None:
            self.on_batch(batch)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        try:
            fault_point("engine.generate")
            results = self.pm.complete([Completion(r.user_id, r.prompt_ids, r.max_new_tokens, r.task,
                                                   self._on_token(r) if (r.stop or r.on_text or not r.task) else None)
                                        for r in batch])
        except Exception as e:  # noqa: BLE001 - every request of the batch learns why
            log.exception("generation batch failed")
            self._failed("generate")
            err = WorkerError(f"generation failed: {type(e).__name__}: {e}")
            for r in batch:
                _settle(r.future, error=err)
            self._failed_batches += 1
            if self._failed_batches >= self.max_consecutive_failures:
                raise EngineDead(f"{self._failed_batches} generation batches in a row failed, the last with "
                                 f"{type(e).__name__}: {e}") from e
            return
        finally:
            self.generating = 0
        self._failed_batches = 0
        for r, res in zip(batch, results):
            if r.error is not None:
                _settle(r.future, error=r.error)
                continue
            text = res.text if r.task else r.text
            try:
                if not r.task and r.on_text is not None and len(text) > len(r.sent):
                    r.on_text(text[len(r.sent):])  # the tail held back while it ended inside a character
            except Exception as e:  # noqa: BLE001 - this request's own stream is gone
                _settle(r.future, error=e)
                continue
            _settle(r.future, {"text": text, "finish_reason": "stop" if r.stopped else res.finish_reason,
                               "personal_shift": res.personal_shift, "shift_version": res.shift_version,
                               "prompt_tokens": len(r.prompt_ids), "completion_tokens": len(res.tokens)})

    def _on_token(self, req: GenRequest):
        tok = self.pm.tok

        def cb(t: int) -> bool:
            if req.error is not None:
                return True
            req.tokens.append(t)
            if req.task:
                return False
            try:
                text = tok.decode(req.tokens, skip_special_tokens=True)
                cut = min((text.find(s) for s in req.stop if s and s in text), default=-1)
                if cut >= 0:
                    text, req.stopped = text[:cut], True
                if req.on_text is not None and not text.endswith("\ufffd") and len(text) > len(req.sent):
                    delta, req.sent = text[len(req.sent):], text
                    req.on_text(delta)
                req.text = text
            except Exception as e:  # noqa: BLE001 - fails this request alone (its stream's loop is gone, ...)
                req.error = e
                return True
            return req.stopped
        return cb

    def _training(self) -> None:
        with self._cv:
            if not self._train:
                return
            users = list(self._train)[: self.pm.cfg.user_group_size]
            jobs = {u: self._train.pop(u) for u in users}
        try:
            fault_point("engine.train")
            histories = self.pm.store.take_jobs(jobs)  # those not erased or replaced since, marked as training
            if not histories:
                return
            reports = self.pm.personalize(histories, desc="serve: personalize", jobs=jobs,
                                          mode="train" if self.mode == "train" else "instant+train")
        except Exception as e:  # noqa: BLE001 - a failed training is a user's status, not a crash
            log.exception("personalization failed for %s", users)
            self._failed("train")
            self.pm.store.fail_jobs(jobs, f"{type(e).__name__}: {e}")
            if self.metrics is not None:
                self.metrics.trainings.labels(outcome="failed").inc(len(users))
            return
        if self.metrics is not None:
            self.metrics.trainings.labels(outcome="ready").inc(len(reports))
