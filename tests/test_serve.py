"""`perfit serve` for real: uvicorn in a subprocess on a free loopback port, a run of the tiny Llama served in float64
(so that answers batched with other users' equal each user's answer alone, to the last bit that matters). Where a
test needs requests to meet in one batch, or to be in flight at a given moment, it holds the worker at a fault point
(perfit.faults `wait:`) and looks at what the server reports, instead of relying on a batching window or a sleep."""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from perfit import PerFitModel
from perfit.data import load_task_data
from perfit.serve.launch import launch, stop
from perfit.store import UserStore

NEW = [{"id": "n1", "description": "A starship crew answers an alien signal.", "tag": "sci-fi"},
       {"id": "n2", "description": "Androids and a warp drive in a distant galaxy.", "tag": "sci-fi"},
       {"id": "n3", "description": "A wizard's quest through an enchanted forest.", "tag": "fantasy"}]


def start_server(run_dir: str, *extra: str, lifetime: int = 300, env: dict | None = None):
    """The server in its own process (float64: see the module's docstring); it stops by itself after `lifetime`."""
    return launch(run_dir, "--dtype", "float64", "--max_wait_ms", "0", "--max_body_bytes", "20000", *extra,
                  lifetime=lifetime, env=env)


class Valve:
    """Every generation batch of the server passes a `wait:` fault point on this file: open (the file exists) it
    passes at once; `close()` makes the next batch wait there until `open()`."""

    def __init__(self, folder):
        self.path = os.path.join(str(folder), "valve")
        self.open()

    def env(self) -> dict:
        return dict(os.environ, PERFIT_FAULT=f"engine.generate%1=wait:{self.path}")

    def open(self):
        open(self.path, "w").close()

    def close(self):
        for p in (self.path, self.path + ".reached"):
            if os.path.exists(p):
                os.unlink(p)

    def held(self, timeout=60):
        end = time.monotonic() + timeout
        while not os.path.exists(self.path + ".reached"):
            assert time.monotonic() < end, "no batch reached the valve"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def served(finished_run, tmp_path_factory):
    cfg, res = finished_run
    folder = tmp_path_factory.mktemp("served")
    run = str(folder / "run")
    shutil.copytree(res["run_dir"], run)  # the server changes the store
    valve = Valve(folder)
    proc, url = start_server(run, env=valve.env())
    yield run, url, cfg, valve
    valve.open()
    log = stop(proc)
    assert "Traceback" not in log, log[-3000:]


def _queries(cfg):
    td = load_task_data(cfg.data_dir, "movie_tagging")
    return [(u.user_id, q.input) for u in td.test_users for q in u.query]


def test_health_models_openapi_and_metrics(served):
    run, url, _, _ = served
    h = httpx.get(url + "/healthz").json()
    assert {k: h[k] for k in ("status", "users_stored", "task", "model", "queue_depth", "training_queue")} == \
        {"status": "ok", "users_stored": 3, "task": "movie_tagging", "model": "tiny", "queue_depth": 0, "training_queue": 0}
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "perfit"
    spec = httpx.get(url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/generate", "/v1/users/{user_id}/history"} <= set(spec["paths"])
    assert httpx.get(url + "/docs").status_code == 200
    before = _metric(url, 'perfit_requests_total{code="200",endpoint="/v1/models"}')
    httpx.get(url + "/v1/models")
    assert _metric(url, 'perfit_requests_total{code="200",endpoint="/v1/models"}') == before + 1
    assert _metric(url, "perfit_queue_depth") == _metric(url, "perfit_training_queue") == _metric(url, "perfit_generating") == 0


def test_concurrent_users_each_get_their_own_answer(served):
    """Requests of several users (and one unknown) waiting together are answered in one mixed-user batch (the server's
    batch-size metric says so), and each answer equals PerFitModel.generate for that user alone."""
    run, url, cfg, valve = served
    qs = _queries(cfg) + [("stranger", _queries(cfg)[0][1])]
    count, total = _metric(url, "perfit_batch_size_count"), _metric(url, "perfit_batch_size_sum")
    post = lambda q: httpx.post(url + "/v1/generate", json={"user_id": q[0], "input": q[1]}, timeout=60).json()  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(len(qs)) as ex:
        valve.close()
        first = ex.submit(post, qs[0])
        valve.held()  # the first request's batch waits at the valve
        rest = [ex.submit(post, q) for q in qs[1:]]
        end = time.monotonic() + 60
        while httpx.get(url + "/healthz").json()["queue_depth"] < len(qs) - 1 and time.monotonic() < end:
            time.sleep(0.01)
        valve.open()
        got = [first.result()] + [f.result() for f in rest]
    assert _metric(url, "perfit_batch_size_count") - count == 2  # the first alone, then all the others together
    assert _metric(url, "perfit_batch_size_sum") - total == len(qs)
    pm = PerFitModel.from_run(run, dtype="float64")
    want = pm.generate([u for u, _ in qs], [x for _, x in qs])
    store = UserStore(os.path.join(run, "users.sqlite"))
    for (u, x), g in zip(qs, got):
        assert g["output"] == pm.generate([u], [x])[0] and g["user_id"] == u
        assert g["personal_shift"] == (u != "stranger") and g["shift_version"] == store.version(u)
    assert [g["output"] for g in got] == list(want)
    assert got[-1]["output"] == pm.generate(["x"], [qs[-1][1]], variant="stage1")[0]  # unknown: the stage-1 shifts


def _metric(url, name) -> float:
    """A sample's value; `name` may carry its labels as Prometheus prints them (sorted by label name)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_openai_client_completions_chat_and_streaming(served):
    from openai import OpenAI

    run, url, cfg, _ = served
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    prompt = _queries(cfg)[2][1]
    c = client.completions.create(model="perfit", prompt=prompt, max_tokens=6, temperature=0, user="u0001")
    pm = PerFitModel.from_run(run, dtype="float64")
    ids = pm.tok(prompt)["input_ids"]
    from perfit.model import Completion

    ref = pm.complete([Completion("u0001", ids, 6)])[0]
    assert c.object == "text_completion" and c.choices[0].text == ref.text and c.choices[0].finish_reason == ref.finish_reason
    assert c.usage.completion_tokens == len(ref.tokens) and c.usage.prompt_tokens == len(ids)
    assert c.model_extra["perfit"] == {"user": "u0001", "personal_shift": True, "shift_version": pm.store.version("u0001")}
    parts = list(client.completions.create(model="perfit", prompt=prompt, max_tokens=6, user="u0001", stream=True))
    assert "".join(p.choices[0].text for p in parts) == c.choices[0].text  # streamed = whole
    assert parts[-1].choices[0].finish_reason == c.choices[0].finish_reason
    chat = client.chat.completions.create(model="perfit", messages=[{"role": "user", "content": "Name a movie tag."}],
                                          max_tokens=5, user="u0002")
    assert chat.choices[0].message.role == "assistant" and chat.model_extra["perfit"]["personal_shift"] is True
    streamed = client.chat.completions.create(model="perfit", messages=[{"role": "user", "content": "Name a movie tag."}],
                                              max_tokens=5, user="u0002", stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    # a stop string ends the answer before it
    full = client.completions.create(model="perfit", prompt=prompt, max_tokens=8, user="u0001").choices[0].text
    if len(full) > 2:
        cut = client.completions.create(model="perfit", prompt=prompt, max_tokens=8, user="u0001", stop=[full[2]])
        assert cut.choices[0].text == full[: full.index(full[2])] and cut.choices[0].finish_reason == "stop"


def test_online_personalization_then_erasure(served):
    run, url, cfg, _ = served
    query = _queries(cfg)[0][1]
    assert httpx.get(url + "/v1/users/newcomer").json()["status"] == "none"
    t0 = time.time()
    r = httpx.post(url + "/v1/users/newcomer/history", json={"items": NEW})
    assert r.status_code == 202 and r.json()["status"] in ("queued", "training") and r.json()["items"] == 3
    for _ in range(300):
        st = httpx.get(url + "/v1/users/newcomer").json()
        if st["status"] in ("ready", "failed"):
            break
        time.sleep(0.1)
    stored = UserStore(os.path.join(run, "users.sqlite")).entry("newcomer")
    assert st["status"] == "ready" and st["items"] == 3 and st["final_loss"] == stored["final_loss"] == stored["epoch_losses"][-1]
    assert t0 <= st["trained_at"] <= time.time()
    g = httpx.post(url + "/v1/generate", json={"user_id": "newcomer", "input": query}).json()
    assert g["personal_shift"] is True
    assert g["output"] == PerFitModel.from_run(run, dtype="float64").generate(["newcomer"], [query])[0]
    d = httpx.delete(url + "/v1/users/newcomer")
    assert d.status_code == 200 and d.json() == {"user_id": "newcomer", "deleted": True}
    assert httpx.get(url + "/v1/users/newcomer").json()["status"] == "none"
    assert not PerFitModel.from_run(run).has_user("newcomer")
    g = httpx.post(url + "/v1/generate", json={"user_id": "newcomer", "input": query}).json()
    assert g["personal_shift"] is False
    assert httpx.delete(url + "/v1/users/newcomer").json()["deleted"] is False


BAD = [
    ("post", "/v1/completions", b'{"model": "perfit", "prompt": ', 400, "malformed JSON"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("post", "/v1/completions", {"model": "perfit"}, 400, "prompt"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "colour": "red"}, 400, "colour"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "max_tokens": 10**9}, 400, "limit of 256"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x" * 30000}, 413, "request body over"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "temperature": 0.7}, 400, "greedy"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "n": 2}, 400, "n"),
    ("post", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": ""}, 400, "prompt"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "x", "user": "../../etc/passwd"}, 400, "user id"),
    ("post", "/v1/completions", {"model": "perfit", "prompt": "y " * 5000, "max_tokens": 8}, 400, "tokens"),
    ("post", "/v1/chat/completions", {"model": "perfit", "messages": []}, 400, "messages"),
    ("post", "/v1/chat/completions", {"model": "perfit", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("post", "/v1/generate", {"user_id": "", "input": "x"}, 400, "user id"),
    ("post", "/v1/generate", {"user_id": "u" * 300, "input": "x"}, 400, "user id"),
    ("post", "/v1/generate", b"hello", 400, "malformed JSON"),
    ("post", "/v1/users/ok-user/history", {"items": []}, 400, "items"),
    ("post", "/v1/users/ok-user/history", {"items": [{"id": "1", "description": "d", "tag": "horror"}]}, 400, "horror"),
    ("post", "/v1/users/ok-user/history", {"items": [{"id": "1", "tag": "comedy"}]}, 400, "missing field 'description'"),
    ("get", "/v1/users/bad%20id!", None, 400, "user id"),
    ("get", "/v1/users/..%2F..%2Fetc%2Fpasswd", None, 404, "Not Found"),
    ("delete", "/v1/nothing-here", None, 404, "Not Found"),
]


@pytest.mark.parametrize("method,path,body,code,words", BAD, ids=[f"{i}-{b[1].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, method, path, body, code, words):
    run, url, _, _ = served
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        ({"json": body} if body is not None else {})
    r = httpx.request(method.upper(), url + path, timeout=30, **kw)
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["code"] == code and err["type"]
    assert httpx.get(url + "/healthz").json()["status"] == "ok"


def test_api_key_and_binding(finished_run, tmp_path):
    cfg, res = finished_run
    key = tmp_path / "key"
    key.write_text("s3cret-key-of-some-length\n")
    proc, url = start_server(res["run_dir"], "--api_key_file", str(key), lifetime=60)
    try:
        assert httpx.get(url + "/healthz").status_code == 200  # health needs no key
        body = {"user_id": "u0001", "input": "x"}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-key-of-some-length"}):
            r = httpx.post(url + "/v1/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(url + "/v1/generate", json=body, headers={"authorization": "Bearer s3cret-key-of-some-length"})
        assert ok.status_code == 200 and ok.json()["personal_shift"] is True
    finally:
        stop(proc)
    # beyond loopback only with a key; checked before anything binds or loads
    r = subprocess.run([sys.executable, "-m", "perfit.cli", "serve", "--run_dir", res["run_dir"], "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--host 0.0.0.0: listening beyond loopback requires --api_key_file" in r.stderr


def test_failed_training_keeps_the_previous_shift_and_says_why(finished_run, tmp_path, monkeypatch):
    from perfit.serve.engine import Engine, GenRequest

    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    pm = PerFitModel.from_run(run)
    before = pm.store.get("u0001")
    engine = Engine(pm, max_wait_ms=1)
    engine.start()
    try:
        def broken(*a, **k):
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(pm, "personalize", broken)
        assert engine.personalize("u0001", NEW)["status"] == "queued"
        for _ in range(200):
            st = engine.user_status("u0001")
            if st["status"] == "failed":
                break
            time.sleep(0.05)
        assert st["status"] == "failed" and "CUDA out of memory (simulated)" in st["error"]
        assert st["serving"]["items"] == 4  # what still serves: the shift trained before
        after = PerFitModel.from_run(run).store.get("u0001")
        assert all((after[k] == before[k]).all() for k in before)
        out = engine.generate(GenRequest("u0001", pm.prompt_ids(["a film"])[0], 4, task=True)).result(60)
        assert out["personal_shift"] is True
    finally:
        engine.stop()


def test_shutdown_lets_in_flight_requests_finish(finished_run, tmp_path):
    """SIGTERM while a request's batch is being answered (held at a fault point, so it is in flight for sure): the
    request is answered in full, then the server shuts down cleanly."""
    _, res = finished_run
    valve = Valve(tmp_path)
    valve.close()
    proc, url = start_server(res["run_dir"], lifetime=60, env=valve.env())
    body = {"model": "perfit", "prompt": "a long answer please", "max_tokens": 40, "user": "u0001"}
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fut = ex.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
        valve.held()
        out_later = ex.submit(stop, proc)  # SIGTERM while the request is being answered
        end = time.monotonic() + 30
        while "Shutting down" not in open(proc.log_path).read():
            assert time.monotonic() < end, "the server did not start shutting down"
            time.sleep(0.05)
        valve.open()
        r = fut.result()
        out = out_later.result()
    from perfit.model import Completion

    pm = PerFitModel.from_run(res["run_dir"], dtype="float64")
    ref = pm.complete([Completion("u0001", pm.tok(body["prompt"])["input_ids"], 40)])[0]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text
    assert r.json()["usage"]["completion_tokens"] == len(ref.tokens)
    assert out.index("Shutting down") < out.rindex('"POST /v1/completions HTTP/1.1" 200')
    # uvicorn finishes the request, shuts the app down (the engine ends after its job in hand), then re-raises SIGTERM
    assert "Application shutdown complete" in out and "Traceback" not in out
