"""A soak of `perfit serve`: many clients for a bounded time while users are personalized, retrained and erased,
worker faults are injected and the server is killed (SIGKILL, with every process it started) and restarted; then
every answer is checked against PerFitModel.complete with the shift version it was answered with.

1. The serve_load run (bundled model, generated movie_tagging data; made once under --work_dir), copied afresh.
2. The server on a fixed loopback port (vLLM two requests at a time, so that requests wait admitted while users
   change); --clients threads send, in a random mix, task queries (/v1/generate, the embedded engine only), OpenAI
   completions (the `openai` client, `user` set) and bad requests (a 4xx expected), for users that are stored and
   stable, users that change, and strangers that never have a shift.
3. One operator thread changes the changing users: with the embedded engine it posts histories (202) and erases
   (DELETE) through the server; with vLLM it writes shifts into the run's store and erases them there (what
   `perfit personalize` and `perfit forget` do). The embedded server runs with faults injected in its worker
   (PERFIT_FAULT: every 11th generation batch, every 4th training group and every 5th instant pass raise; the
   trainer process inherits them).
4. A chaos thread kills the server every --seconds / (--restarts + 1) and starts it again on the same port.
5. After the last restart, the embedded server drains its training queue; then it is stopped and every answer is
   compared with PerFitModel.complete computed for the shift it was answered with: the embedded engine reports the
   version (`shift_version`; float64, so equal means equal); for vLLM (float32) any version the user had between
   the request's sending and its answer counts, and tokens may differ first where vLLM's top-2 logprobs are within
   1e-3 (the near-tie rule of the vLLM tests).

    python benchmarks/serve_soak.py [--engine embedded|vllm|both] [--seconds 150] [--clients 6] [--restarts 2]
        [--personalize train|instant|instant+train] [--trainer process|inline]

One line per engine, last: requests=N errors_5xx=N wrong_answers=N leaked=N lost_jobs=N hung=N restarts=K, where a
wrong answer differs from the reference, a leaked one is a wrong answer that another user's shift (or a stranger's
answer that any personal shift) explains, a lost job is a 202 whose user never became ready (nor failed, with its
error, nor was erased afterwards), and a hung request got no answer within --timeout seconds. Requests refused
while the server was down (connection errors) are counted apart, as `down`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from collections import defaultdict

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import make_run, run_data  # noqa: E402

from perfit import PerFitModel  # noqa: E402
from perfit.model import Completion  # noqa: E402
from perfit.serve.launch import free_port, kill_group, launch, stop  # noqa: E402
from perfit.store import UserStore  # noqa: E402

STABLE, CHANGING, STRANGERS = 3, 6, 2
FAULTS = "engine.generate%11=raise,engine.train%4=raise,engine.instant%5=raise"


class Soak:
    def __init__(self, args, engine: str, run: str, td):
        self.args, self.engine, self.run = args, engine, run
        self.store = UserStore(os.path.join(run, "users.sqlite"))
        trained = self.store.users()
        self.stable = trained[:STABLE]
        self.changing = [f"soak-{k}" for k in range(CHANGING)]
        self.strangers = [f"stranger-{k}" for k in range(STRANGERS)]
        self.histories = {u: td.test_users[k % len(td.test_users)].profile for k, u in enumerate(self.changing)}
        self.inputs = [q.input for u in td.test_users[:3] for q in u.query[:2]]  # few prompts: few references
        self.pm = PerFitModel.from_run(run, device="cpu", dtype="float64" if engine == "embedded" else "float32")
        self.lock = threading.Lock()
        self.answers: list[dict] = []
        self.counts = defaultdict(int)
        self.timeline: dict[str, list[tuple[float, float, str | None]]] = defaultdict(list)  # user -> (t0, t1, version)
        self.versions: dict[str, tuple[str, dict]] = {}  # version -> (user, tensors), as seen in the store
        self.posts: dict[str, tuple[float, bool]] = {}  # user -> (time of its last accepted post, still the last op)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.up = threading.Event()
        self.stop_at = 0.0
        self.restarts = 0
        self.proc = None
        for u in self.stable:
            self._seen(u)

    # ---------------------------------------------------------------- the server

    def start(self):
        # vLLM two requests at a time: the others wait admitted while users change (the window a version read twice
        # would open)
        extra = ["--dtype", "float64", "--max_wait_ms", "5", "--personalize", self.args.personalize, "--trainer",
                 self.args.trainer] if self.engine == "embedded" else \
            ["--engine", "vllm", "--dtype", "float32", "--max_batch_size", "2", "--vllm_args=--block-size 32"]
        env = dict(os.environ, PERFIT_FAULT=FAULTS) if self.engine == "embedded" else None
        self.proc, _ = launch(self.run, *extra, "--device", "cpu", port=self.port, env=env, new_session=True,
                              lifetime=self.args.seconds * 4 + 1200, timeout=600)
        self.up.set()

    def chaos(self):
        """Kill and restart the server --restarts times, evenly over the soak's up time (the time a restart takes is
        added to the soak, so that clients get --seconds of a running server)."""
        every = self.args.seconds / (self.args.restarts + 1)
        for k in range(self.args.restarts):
            time.sleep(every)
            self.up.clear()
            t0 = time.monotonic()
            kill_group(self.proc)
            self.restarts += 1
            print(f"[soak] {self.engine}: killed the server (-9), restart {self.restarts}", flush=True)
            self.start()
            self.stop_at += time.monotonic() - t0

    # ---------------------------------------------------------------- the operator and what the store holds

    def _seen(self, user):
        got = self.store.get_versioned(user)
        if got is not None and got[1] not in self.versions:
            self.versions[got[1]] = (user, got[0])

    def watch(self):
        """Every version a user gets, read from the store as it appears (replaced ones stay readable 10 min)."""
        while time.monotonic() < self.stop_at + 60:
            for u, v in self.store.versions(self.changing).items():
                if v not in self.versions:
                    t = self.store.get_version(u, v)
                    if t is not None:
                        self.versions[v] = (u, t)
            time.sleep(0.05)

    def operate(self):
        rng = random.Random(1)
        base = {u: self.store.get(u) for u in self.stable}
        while time.monotonic() < self.stop_at:
            u = rng.choice(self.changing)
            op = rng.choice(["post", "post", "erase"])
            if self.engine == "vllm":  # what perfit personalize / perfit forget write
                t0 = time.time()
                if op == "post":
                    src = base[rng.choice(self.stable)]
                    self.store.put_many({u: {k: v * rng.uniform(1.5, 4.0) for k, v in src.items()}})
                else:
                    self.store.delete(u)
                self._seen(u)
                self.timeline[u].append((t0, time.time(), self.store.version(u)))
            else:
                self.up.wait()
                try:
                    if op == "post":
                        items = rng.sample(self.histories[u], rng.randint(3, 6))
                        t0 = time.time()
                        r = httpx.post(f"{self.url}/v1/users/{u}/history", json={"items": items}, timeout=60)
                        if r.status_code == 202:
                            self.posts[u] = (t0, True)
                        self.counts["requests"] += 1
                        self.counts["errors_5xx"] += r.status_code >= 500
                    else:
                        if u in self.posts:  # from now on, whether the post's job is wanted depends on the erasure
                            self.posts[u] = (self.posts[u][0], False)
                        r = httpx.delete(f"{self.url}/v1/users/{u}", timeout=60)
                        self.counts["requests"] += 1
                        self.counts["errors_5xx"] += r.status_code >= 500
                except httpx.HTTPError:
                    self.counts["down"] += 1
            time.sleep(rng.uniform(0.2, 1.0) if self.engine == "vllm" else rng.uniform(1.0, 3.0))

    # ---------------------------------------------------------------- clients

    def client(self, k: int):
        from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI

        rng = random.Random(100 + k)
        oai = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=self.args.timeout)
        http = httpx.Client(timeout=self.args.timeout)
        while time.monotonic() < self.stop_at:
            if not self.up.wait(timeout=1):
                continue
            user = rng.choice(self.stable + self.changing + self.strangers)
            text = rng.choice(self.inputs)
            kind = rng.choice(["bad", "completion"] + (["generate", "generate"] if self.engine == "embedded" else ["completion"]))
            t0 = time.time()
            try:
                if kind == "bad":
                    body = rng.choice([{"user_id": "../etc", "input": text}, {"user_id": user, "input": "x " * 9000},
                                       {"user_id": user}])
                    r = http.post(self.url + ("/v1/generate" if self.engine == "embedded" else "/v1/completions"), json=body)
                    self.count(r.status_code, bad=True)
                    continue
                if kind == "generate":
                    r = http.post(self.url + "/v1/generate", json={"user_id": user, "input": text})
                    self.count(r.status_code)
                    if r.status_code == 200:
                        j = r.json()
                        self.record(kind, user, text, t0, j["output"], j["shift_version"], j["personal_shift"])
                    continue
                prompt = self.pm.builder.query_prompt(text)
                extra = {"logprobs": 2, "extra_body": {"return_token_ids": True}} if self.engine == "vllm" else {}
                c = oai.completions.create(model="perfit", prompt=prompt, max_tokens=8, temperature=0, user=user, **extra)
                self.count(200)
                ch = c.choices[0]
                if self.engine == "vllm":
                    tops = [sorted(d.values(), reverse=True) for d in ch.logprobs.top_logprobs]
                    self.record(kind, user, text, t0, list(ch.model_extra["token_ids"]), None, None, tops)
                else:
                    p = c.model_extra["perfit"]
                    self.record(kind, user, text, t0, ch.text, p["shift_version"], p["personal_shift"])
            except (httpx.TimeoutException, APITimeoutError):
                self.counts["hung"] += 1
            except APIStatusError as e:
                self.count(e.status_code)
            except (httpx.HTTPError, APIConnectionError):
                self.counts["down"] += 1

    def count(self, code: int, bad: bool = False):
        with self.lock:
            self.counts["requests"] += 1
            self.counts["errors_5xx"] += code >= 500
            self.counts["rejected_429"] += code == 429
            if bad and code < 400:
                self.counts["wrong_answers"] += 1  # a bad request that was answered

    def record(self, kind, user, text, t0, out, version, personal, tops=None):
        with self.lock:
            self.answers.append({"kind": kind, "user": user, "text": text, "t0": t0, "t1": time.time(), "out": out,
                                 "version": version, "personal": personal, "tops": tops})

    # ---------------------------------------------------------------- the soak and its verdict

    def soak(self) -> str:
        self.start()
        self.stop_at = time.monotonic() + self.args.seconds
        threads = [threading.Thread(target=self.client, args=(k,), daemon=True) for k in range(self.args.clients)]
        threads += [threading.Thread(target=f, daemon=True) for f in (self.operate, self.watch, self.chaos)]
        for t in threads:
            t.start()
        for t in threads[:-2]:
            t.join(self.args.seconds + 2 * self.args.timeout + 600)
        threads[-1].join()  # the last restart is done
        self.counts["hung"] += sum(t.is_alive() for t in threads[: self.args.clients])
        lost = self.drain() if self.engine == "embedded" else 0
        stop(self.proc, timeout=60)
        threads[-2].join()
        wrong, leaked, unverified = self.verify()
        c = self.counts
        return (f"engine={self.engine} requests={c['requests']} errors_5xx={c['errors_5xx']} "
                f"wrong_answers={wrong + c['wrong_answers']} leaked={leaked} lost_jobs={lost} hung={c['hung']} "
                f"restarts={self.restarts} answers_checked={len(self.answers) - unverified} unverified={unverified} "
                f"down={c['down']} rejected_429={c['rejected_429']} versions={len(self.versions)}")

    def drain(self) -> int:
        """Wait until no job is queued or training; count the accepted posts whose user did not end ready (or
        failed, with its error) after them."""
        end = time.monotonic() + 900
        while time.monotonic() < end:
            h = httpx.get(self.url + "/healthz", timeout=30).json()
            states = [httpx.get(f"{self.url}/v1/users/{u}", timeout=30).json() for u in self.changing]
            if h["training_queue"] == 0 and not any(s["status"] in ("queued", "training") for s in states):
                break
            time.sleep(1)
        lost = 0
        for u, (t, last) in self.posts.items():
            if not last:
                continue  # erased afterwards
            st = httpx.get(f"{self.url}/v1/users/{u}", timeout=30).json()
            ok = (st["status"] == "ready" and st["trained_at"] >= t) or (st["status"] == "failed" and st.get("error"))
            if not ok:
                print(f"[soak] lost job: {u} posted at {t:.1f}, now {st}", flush=True)
            lost += not ok
        return lost

    def verify(self) -> tuple[int, int, int]:
        """References for every (shift version, prompt, kind) answered, computed in one scratch run whose store holds
        each version under a user of its own; then each answer against them."""
        scratch = self.run + "-reference"
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        for f in ("config.json", "prompts.json", "task_reft"):
            src = os.path.join(self.run, f)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(scratch, f))
        ref_store = UserStore(os.path.join(scratch, "users.sqlite"), self.store.config)
        ids = {v: f"v{k}" for k, v in enumerate(self.versions)}
        ref_store.put_many({ids[v]: t for v, (_, t) in self.versions.items()})
        pm = PerFitModel.from_run(scratch, device="cpu", dtype="float64" if self.engine == "embedded" else "float32")
        want = {}
        jobs = sorted({(a["kind"], v, a["text"]) for a in self.answers for v in self.candidates(a)}, key=str)
        for s in range(0, len(jobs), 64):
            part = jobs[s: s + 64]
            reqs = [self.completion(pm, kind, ids.get(v, "nobody"), text) for kind, v, text in part]
            for key, res in zip(part, pm.complete(reqs)):
                want[key] = res.tokens if self.engine == "vllm" else res.text
        wrong = leaked = unverified = 0
        for a in self.answers:
            cands = self.candidates(a)
            if any(v is not None and v not in self.versions for v in cands):
                unverified += 1
                continue
            if any(self.same(a, want[(a["kind"], v, a["text"])]) for v in cands):
                if self.engine == "embedded" and a["personal"] != (a["version"] is not None):
                    wrong += 1
                continue
            wrong += 1
            others = [v for v, (u, _) in self.versions.items() if u != a["user"]]
            leaked += a["user"] in self.strangers or any(
                self.same(a, want.get((a["kind"], v, a["text"]), None)) for v in others if (a["kind"], v, a["text"]) in want)
            print(f"[soak] wrong answer: {json.dumps({k: a[k] for k in ('kind', 'user', 'version', 'out')})}", flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
        return wrong, leaked, unverified

    def candidates(self, a) -> list[str | None]:
        """The shift versions an answer may have been given with: the reported one (embedded), or every version the
        user had between the request's sending and its answer (vLLM)."""
        if self.engine == "embedded":
            return [a["version"]]
        if a["user"] not in self.timeline:
            return [self.store_version_at_start(a["user"])]
        out, current = [], self.store_version_at_start(a["user"])
        for t0, t1, v in self.timeline[a["user"]]:
            if t1 < a["t0"]:
                current = v
            elif t0 <= a["t1"]:
                out.append(v)
        return list(dict.fromkeys([current] + out))

    def store_version_at_start(self, user):
        if user in self.stable:
            return next(v for v, (u, _) in self.versions.items() if u == user)
        return None

    def completion(self, pm, kind, ref_user, text):
        n = pm.task.max_new_tokens if kind == "generate" else 8
        if kind == "generate":
            return Completion(ref_user, pm.prompt_ids([text], max_new_tokens=n)[0], n, task=True)
        return Completion(ref_user, pm.tok(pm.builder.query_prompt(text))["input_ids"], n, task=False)

    def same(self, a, ref) -> bool:
        if ref is None:
            return False
        if self.engine == "embedded":
            return a["out"] == ref
        tokens = a["out"][:-1] if a["out"] and a["out"][-1] == self.pm.tok.eos_token_id else a["out"]
        for j, (x, y) in enumerate(zip(tokens, ref)):
            if x != y:
                return a["tops"][j][0] - a["tops"][j][1] < 1e-3
        return tokens == ref


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["embedded", "vllm", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="a request unanswered after this many seconds is hung")
    ap.add_argument("--work_dir", default="/tmp/perfit-bench/serve")
    ap.add_argument("--personalize", choices=["train", "instant", "instant+train"], default="train",
                    help="embedded engine: how posted histories become shifts (instant modes: the run gets a generator)")
    ap.add_argument("--trainer", choices=["process", "inline"], default="process", help="embedded engine: where it trains")
    args = ap.parse_args()
    base = make_run(args.work_dir, "movie_tagging", generator=args.personalize != "train")
    td = run_data(base, "movie_tagging")
    engines = ["embedded", "vllm"] if args.engine == "both" else [args.engine]
    if "vllm" in engines:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            print("[soak] vLLM is not installed: the vllm engine is skipped")
            engines.remove("vllm")
    lines = []
    for engine in engines:
        run = os.path.join(args.work_dir, f"soak-{engine}")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run, ignore=shutil.ignore_patterns("cache"))
        store = UserStore(os.path.join(run, "users.sqlite"))
        for u in store.users()[STABLE:]:  # keep a few stable users: fewer references to compute
            store.delete(u)
        torch.manual_seed(0)
        t0 = time.time()
        line = Soak(args, engine, run, td).soak()
        print(f"[soak] {engine}: {time.time() - t0:.0f} s in all", flush=True)
        lines.append(line)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
