"""What the embedded server promises under faults, concurrency and restarts: a request never hangs, an error fails
only the requests it concerns, the worker that cannot go on says so and exits, queues are bounded, what got a 202
survives kill -9, an erased user leaves nothing behind, and a user changed by another process is served its new
state. The worker is held at named fault points (perfit.faults: `wait:<file>` holds it until the test lets it go),
so no test depends on a sleep or a batching window. The tiny run is served in float64: answers compare exactly."""
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import torch

from perfit import PerFitModel, faults
from perfit.config import ServeConfig
from perfit.model import Completion

NEW = [{"id": "n1", "description": "A starship crew answers an alien signal.", "tag": "sci-fi"},
       {"id": "n2", "description": "Androids and a warp drive in a distant galaxy.", "tag": "sci-fi"},
       {"id": "n3", "description": "A wizard's quest through an enchanted forest.", "tag": "fantasy"}]
QUERY = "description: A crew of androids flees a dying galaxy."


class Gate:
    """A `wait:` fault point: `reached()` blocks until the code is held there, `open()` lets it go on."""

    def __init__(self, folder, name="gate"):
        self.path = os.path.join(str(folder), name)

    def spec(self, point: str, n: int = 1) -> str:
        return f"{point}:{n}=wait:{self.path}"

    def reached(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not os.path.exists(self.path + ".reached"):
            assert time.monotonic() < end, f"the code never reached the fault point ({self.path})"
            time.sleep(0.01)

    def open(self) -> None:
        open(self.path, "w").close()


@pytest.fixture
def run(finished_run, tmp_path):
    _, res = finished_run
    r = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], r)
    return r


@pytest.fixture
def fault(monkeypatch):
    def set_fault(spec: str) -> None:
        faults.reset()
        monkeypatch.setenv(faults.ENV, spec)
    yield set_fault
    faults.reset()


def _engine(pm, **kw):
    from perfit.serve.engine import Engine

    e = Engine(pm, max_wait_ms=0, **kw)
    e.start()
    return e


def _req(pm, user="u0001", text=QUERY, **kw):
    """A task query as /v1/generate sends it (the task's answer length, as PerFitModel.generate uses)."""
    from perfit.serve.engine import GenRequest

    return GenRequest(user, pm.prompt_ids([text])[0], pm.task.max_new_tokens, task=True, **kw)


def _answer(run, user, text=QUERY):
    return PerFitModel.from_run(run, dtype="float64").generate([user], [text])[0]


def _wait_status(get, want=("ready", "failed"), timeout=60.0):
    end = time.monotonic() + timeout
    while True:
        st = get()
        if st["status"] in want or time.monotonic() > end:
            return st
        time.sleep(0.05)


# ------------------------------------------------------------------ supervision: the worker goes on, or says it cannot

def test_a_request_cancelled_while_the_worker_holds_it_does_not_end_the_worker(run, tmp_path, fault):
    """asyncio cancels a request's future when its task is cancelled (a shutdown timeout, a client timeout): the worker
    must not die setting its result (before the fix set_result raised InvalidStateError and ended the thread)."""
    gate = Gate(tmp_path)
    fault(gate.spec("engine.generate"))
    pm = PerFitModel.from_run(run, dtype="float64")
    engine = _engine(pm)
    try:
        first = engine.generate(_req(pm))
        gate.reached()
        first.cancel()
        gate.open()
        later = engine.generate(_req(pm, "u0002"))
        assert later.result(timeout=60)["text"] == _answer(run, "u0002")
        assert engine.health()["status"] == "ok"
    finally:
        engine.stop()


def test_a_failing_request_fails_alone_and_the_batch_it_shared_is_answered(run, tmp_path, fault):
    """A streaming callback that raises (its client's event loop is gone) ends that request with its error; the
    requests batched with it are answered."""
    gate = Gate(tmp_path)
    fault(gate.spec("engine.generate"))
    pm = PerFitModel.from_run(run, dtype="float64")
    engine = _engine(pm)
    seen = []
    engine.on_batch = lambda batch: seen.append([r.user_id for r in batch])
    try:
        first = engine.generate(_req(pm))
        gate.reached()

        def gone(delta):
            raise RuntimeError("Event loop is closed")

        from perfit.serve.engine import GenRequest

        broken = engine.generate(GenRequest("u0002", pm.prompt_ids(["hello"], raw=True)[0], 4, task=False, on_text=gone))
        fine = engine.generate(_req(pm, "u0000"))
        gate.open()
        assert first.result(timeout=60)["text"] == _answer(run, "u0001")
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            broken.result(timeout=60)
        assert fine.result(timeout=60)["text"] == _answer(run, "u0000")
        assert seen == [["u0001"], ["u0002", "u0000"]]  # the two shared a batch: the engine says so, no timing
    finally:
        engine.stop()


@pytest.mark.parametrize("point", ["engine.generate", "engine.train", "engine.erase"])
def test_an_error_in_each_phase_fails_only_what_it_concerns(run, fault, point):
    from perfit.serve.engine import WorkerError

    fault(f"{point}:1=raise")
    pm = PerFitModel.from_run(run, dtype="float64")
    engine = _engine(pm)
    try:
        if point == "engine.generate":
            with pytest.raises(WorkerError, match="fault injected at engine.generate"):
                engine.generate(_req(pm)).result(timeout=60)
        elif point == "engine.train":
            engine.personalize("newcomer", NEW)
            st = _wait_status(lambda: engine.user_status("newcomer"))
            assert st["status"] == "failed" and "fault injected at engine.train" in st["error"]
            engine.personalize("newcomer", NEW)  # the next try trains
            assert _wait_status(lambda: engine.user_status("newcomer"))["status"] == "ready"
        else:
            with pytest.raises(WorkerError, match="fault injected at engine.erase"):
                engine.forget("u0001").result(timeout=60)
            assert pm.store.version("u0001") is not None
            assert engine.forget("u0001").result(timeout=60) is True
        assert engine.generate(_req(pm, "u0002")).result(timeout=60)["text"] == _answer(run, "u0002")
        assert engine.health()["status"] == "ok"
    finally:
        engine.stop()


def test_a_worker_that_cannot_go_on_fails_every_request_and_says_so(run, fault):
    """An error outside any one job (here in the worker's loop itself) is fatal: waiting and later requests get an
    EngineDead error (503), health says why, and the server is told to exit (before the fix the thread ended silently,
    requests waited forever and /healthz said ok)."""
    from perfit.serve.engine import EngineDead

    fault("engine.loop:1=raise")
    pm = PerFitModel.from_run(run, dtype="float64")
    told = []
    engine = _engine(pm, on_fatal=told.append)
    try:
        with pytest.raises(EngineDead, match="fault injected at engine.loop"):
            engine.generate(_req(pm)).result(timeout=30)
        with pytest.raises(EngineDead):
            engine.generate(_req(pm)).result(timeout=30)
        h = engine.health()
        assert h["status"] == "unhealthy" and "fault injected at engine.loop" in h["reason"]
        assert len(told) == 1 and "engine.loop" in told[0]
    finally:
        engine.stop()


def test_consecutive_failed_batches_end_the_worker(run, fault):
    from perfit.serve.engine import EngineDead, WorkerError

    fault("engine.generate%1=raise")  # every batch fails: the device is gone
    pm = PerFitModel.from_run(run, dtype="float64")
    told = []
    engine = _engine(pm, max_consecutive_failures=2, on_fatal=told.append)
    try:
        with pytest.raises(WorkerError):
            engine.generate(_req(pm)).result(timeout=30)
        with pytest.raises(WorkerError):
            engine.generate(_req(pm)).result(timeout=30)
        with pytest.raises(EngineDead, match="2 generation batches in a row failed"):
            engine.generate(_req(pm)).result(timeout=30)
        assert engine.health()["status"] == "unhealthy" and told
    finally:
        engine.stop()


def test_the_server_process_exits_non_zero_when_its_worker_cannot_go_on(run):
    from perfit.serve.launch import launch, stop

    proc, url = launch(run, "--dtype", "float64", lifetime=60, env=dict(os.environ, PERFIT_FAULT="engine.loop:1=raise"))
    try:
        r = httpx.post(url + "/v1/generate", json={"user_id": "u0001", "input": QUERY}, timeout=30)
        assert r.status_code == 503 and "fault injected at engine.loop" in r.json()["error"]["message"]
        assert proc.wait(timeout=30) == 3
    finally:
        out = stop(proc)
    assert "the serving worker cannot go on" in out


# ------------------------------------------------------------------ backpressure and limits

def test_full_queues_answer_429_with_retry_after(run, tmp_path, fault):
    from fastapi.testclient import TestClient

    from perfit.serve.app import create_app

    gate = Gate(tmp_path)
    fault(gate.spec("engine.generate"))
    pm = PerFitModel.from_run(run, dtype="float64")
    sc = ServeConfig(run_dir=run, max_wait_ms=0, max_queued_requests=1, max_queued_users=1)
    with TestClient(create_app(pm, sc)) as client, concurrent.futures.ThreadPoolExecutor(2) as ex:
        body = {"user_id": "u0001", "input": QUERY}
        held = ex.submit(client.post, "/v1/generate", json=body)  # taken by the worker, held at the gate
        gate.reached()
        queued = ex.submit(client.post, "/v1/generate", json=body)  # waits in the queue (its one place)
        end = time.monotonic() + 30
        while client.get("/healthz").json()["queue_depth"] < 1 and time.monotonic() < end:
            time.sleep(0.01)
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "queue" in r.json()["error"]["message"]
        assert client.post("/v1/users/a/history", json={"items": NEW}).status_code == 202
        r = client.post("/v1/users/b/history", json={"items": NEW})
        assert r.status_code == 429 and "retry-after" in r.headers
        assert client.post("/v1/users/a/history", json={"items": NEW}).status_code == 202  # a queued user may repost
        gate.open()
        assert held.result().status_code == queued.result().status_code == 200
        assert held.result().json()["output"] == _answer(run, "u0001")
        assert 'perfit_rejected_total{reason="generation_queue_full"} 1.0' in client.get("/metrics").text


def test_failed_users_statuses_are_bounded(run, fault, monkeypatch):
    from perfit import store as store_mod

    monkeypatch.setattr(store_mod, "FAILED_JOBS_KEPT", 2)
    fault("engine.train%1=raise")
    pm = PerFitModel.from_run(run, dtype="float64")
    engine = _engine(pm)
    try:
        for u in ("f1", "f2", "f3"):
            engine.personalize(u, NEW)
            assert _wait_status(lambda: engine.user_status(u))["status"] == "failed"
        assert [engine.user_status(u)["status"] for u in ("f1", "f2", "f3")] == ["none", "failed", "failed"]
    finally:
        engine.stop()


def test_generate_refuses_an_over_long_input_and_health_shows_no_paths(run):
    from fastapi.testclient import TestClient

    from perfit.serve.app import create_app

    pm = PerFitModel.from_run(run, dtype="float64")
    with TestClient(create_app(pm, ServeConfig(run_dir=run, max_prompt_tokens=300))) as client:
        r = client.post("/v1/generate", json={"user_id": "u0001", "input": "word " * 6000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
        assert "tokens" in r.json()["error"]["message"] and "300" in r.json()["error"]["message"]
        h = client.get("/healthz")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["users_stored"] == 3
        assert os.path.dirname(run) not in h.text and "/" not in json.dumps(h.json()).replace("/healthz", "")


def test_healthz_does_not_block_the_event_loop_on_the_store(run, monkeypatch):
    """/healthz counts the stored users: a slow store (a long write holding the file) must not stall every other
    endpoint of the server. Before the fix the count ran on the event loop and /v1/models waited for it."""
    import threading

    from fastapi.testclient import TestClient

    from perfit.serve.app import create_app
    from perfit.store import UserStore

    pm = PerFitModel.from_run(run, dtype="float64")
    release, entered = threading.Event(), threading.Event()
    real_len = UserStore.__len__

    def slow_len(self):
        entered.set()
        release.wait(30)
        return real_len(self)

    with TestClient(create_app(pm, ServeConfig(run_dir=run))) as client:
        monkeypatch.setattr(UserStore, "__len__", slow_len)
        health = concurrent.futures.ThreadPoolExecutor(1).submit(client.get, "/healthz")
        assert entered.wait(30)
        other = concurrent.futures.ThreadPoolExecutor(1).submit(client.get, "/v1/models")
        try:
            assert other.result(timeout=10).status_code == 200  # answered while the count is held
        finally:
            release.set()
        assert health.result(timeout=30).json()["users_stored"] == 3


# ------------------------------------------------------------------ the store is the truth: other processes, restarts

def test_a_user_changed_by_another_process_is_served_its_new_state(run):
    """`perfit personalize` / `perfit forget` (or a second server) on the same run: the embedded engine's cache of
    shifts follows the store's version of each user, read once per batch."""
    from perfit.rundir import forget_user, run_store

    pm = PerFitModel.from_run(run, dtype="float64")
    ask = lambda: pm.complete([Completion("u0001", pm.prompt_ids([QUERY])[0], pm.task.max_new_tokens, task=True)])[0]  # noqa: E731
    before = ask()
    other = run_store(run)  # another process's view of the same file
    other.put_many({"u0001": {k: 4 * v for k, v in other.get("u0001").items()}})
    now = ask()
    fresh = PerFitModel.from_run(run, dtype="float64").generate(["u0001"], [QUERY])[0]
    assert now.text == fresh and now.shift_version == other.version("u0001") != before.shift_version
    assert pm.generate(["u0001"], [QUERY])[0] == fresh != before.text  # (the test can tell the shifts apart)
    assert forget_user(run, "u0001")
    gone = ask()
    assert not gone.personal_shift and gone.shift_version is None
    assert gone.text == pm.generate(["x"], [QUERY], variant="stage1")[0]


def test_an_erasure_by_another_process_removes_the_queued_history(run, tmp_path, fault):
    """The history a server accepted is queued in the run's store: `perfit forget` removes it with the user, and the
    server holding the job does not store the user afterwards (before the fix it trained and stored it)."""
    from perfit.rundir import forget_user

    gate = Gate(tmp_path)
    fault(gate.spec("engine.train"))
    pm = PerFitModel.from_run(run, dtype="float64")
    engine = _engine(pm)
    try:
        assert engine.personalize("newcomer", NEW)["status"] == "queued"
        gate.reached()  # the worker holds the job
        assert forget_user(run, "newcomer") is True  # the queued job counts as something stored about the user
        gate.open()
        end = time.monotonic() + 30
        while engine.user_status("newcomer")["status"] != "none" and time.monotonic() < end:
            time.sleep(0.05)
        engine.generate(_req(pm)).result(timeout=60)  # a later turn of the worker: the job's turn is over
        assert engine.user_status("newcomer")["status"] == "none" and "newcomer" not in pm.store
        assert pm.store.job("newcomer") is None
    finally:
        engine.stop()


def test_an_erasure_removes_the_users_queued_history_and_its_answers_follow(run, tmp_path, fault):
    gate = Gate(tmp_path)
    fault(gate.spec("engine.generate"))
    pm = PerFitModel.from_run(run, dtype="float64")
    engine = _engine(pm)
    try:
        held = engine.generate(_req(pm, "u0001"))
        gate.reached()
        engine.personalize("u0001", NEW)
        erased = engine.forget("u0001")
        after = engine.generate(_req(pm, "u0001"))  # accepted after the DELETE was: never the erased shift
        gate.open()
        assert held.result(timeout=60)["personal_shift"] is True
        assert erased.result(timeout=60) is True
        got = after.result(timeout=60)
        assert got["personal_shift"] is False and got["shift_version"] is None
        assert got["text"] == pm.generate(["x"], [QUERY], variant="stage1")[0]
        assert pm.store.job("u0001") is None and "u0001" not in pm.store
        assert engine.user_status("u0001")["status"] == "none"
    finally:
        engine.stop()


def test_accepted_history_survives_kill_9_and_the_restarted_server_finishes_it(run):
    """202 means stored: the server is killed (SIGKILL) as it starts training the user, a new server on the same run
    resumes the job, and the user ends with the shift an uninterrupted training stores (before the fix the job was
    only in memory: the user stayed `none`)."""
    from perfit.serve.launch import launch, stop

    ref_run = run + "-ref"
    shutil.copytree(run, ref_run)
    gate = Gate(os.path.dirname(run))
    kill = f"{gate.spec('engine.train')},engine.train:1"  # held as training starts (after the 202), then SIGKILL
    # the inline trainer: the server itself is killed as it trains (the trainer process has its own test)
    proc, url = launch(run, "--dtype", "float64", "--trainer", "inline", lifetime=60,
                       env=dict(os.environ, PERFIT_FAULT=kill))
    r = httpx.post(url + "/v1/users/newcomer/history", json={"items": NEW}, timeout=30)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    gate.reached()
    gate.open()
    assert proc.wait(timeout=60) == -9
    stop(proc)
    proc, url = launch(run, "--dtype", "float64", lifetime=120)
    try:
        st = _wait_status(lambda: httpx.get(url + "/v1/users/newcomer", timeout=30).json())
        assert st["status"] == "ready" and st["items"] == 3, st
        got = httpx.post(url + "/v1/generate", json={"user_id": "newcomer", "input": QUERY}, timeout=60).json()
    finally:
        stop(proc)
    ref = PerFitModel.from_run(ref_run, dtype="float64")
    ref.personalize({"newcomer": NEW})
    want, stored = ref.store.get("newcomer"), PerFitModel.from_run(run).store.get("newcomer")
    for k, t in want.items():
        torch.testing.assert_close(stored[k], t, rtol=0, atol=1e-12)
    assert got["output"] == ref.generate(["newcomer"], [QUERY])[0] and got["personal_shift"] is True


# ------------------------------------------------------------------ the stage-1 checkpoint and predict --run_dir

def test_the_stage1_checkpoint_is_old_or_new_at_every_moment(run, fault):
    """A stage-1 checkpoint replaced by --overwrite 1 and cut off in the middle of the swap (an error there stands
    for the crash) leaves a whole checkpoint that loads: before the fix the old one was deleted before the new one
    was moved in."""
    import dataclasses

    from perfit.faults import InjectedFault
    from perfit.rundir import CKPT, load_collective

    pm = PerFitModel.from_run(run, dtype="float64")
    old = {k: v.clone() for k, v in pm.collective.state_dict().items()}
    pm2 = PerFitModel(dataclasses.replace(pm.cfg, lr=0.05, stage1_epochs=1), (pm.model, pm.tok, pm.info), run,
                      pm.fingerprints)
    ex = [pm2.builder.history_example(it, "someone-else") for it in NEW]
    fault("stage1.ckpt_swap=raise")
    with pytest.raises(InjectedFault):
        pm2.fit_collective(ex)
    sh, meta = load_collective(os.path.join(run, CKPT))
    new = sh.state_dict()
    assert meta["stage1_key"] == pm2.keys()["stage1"]  # the new one, whole: tensors and meta agree
    assert any(not torch.equal(new[k], old[k]) for k in old)


def test_predict_with_run_dir_applies_its_flags_or_refuses_them(finished_run, tmp_path):
    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    cli = [sys.executable, "-m", "perfit.cli", "predict", "--run_dir", run]
    r = subprocess.run(cli + ["--dtype", "float64", "--eval_batch_size", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(os.path.join(run, "results.json")))["model"]["dtype"] == "float64"
    r = subprocess.run(cli + ["--user_lr", "0.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--user_lr" in r.stderr and "cannot be applied" in r.stderr, r.stderr[-2000:]
