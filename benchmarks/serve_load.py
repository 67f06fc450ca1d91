"""`perfit serve` under load: many users at once against the same requests one at a time, and how fast a new user's
shift is ready.

1. A run on the bundled model (generated data of --task_name, default movie_tagging; stage 1 one epoch, 4 users trained one epoch: quality
   does not matter here), made once under --work_dir.
2. 1,000 distinct stored users: the 4 trained users' shifts, each copied with seeded Gaussian noise (0.01 of each
   tensor's standard deviation) so that every user has a shift of its own, written through the user store.
3. The server on loopback; for --seconds, --clients threads send task queries (/v1/generate) of random users among
   the 1,000; then the same requests, one at a time, for --seconds.
4. A new user's 20 history items posted; the seconds until its status is ready.

    python benchmarks/serve_load.py [--task_name movie_tagging] [--seconds 45] [--clients 32]

Last line: batched_vs_sequential=<rps ratio> errors=<n> personalize_s=<seconds>
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import threading
import time

import httpx
import torch

from perfit import PerFitModel, pipeline
from perfit.config import RunConfig
from perfit.data import load_task_data
from perfit.serve.launch import launch, stop

N_USERS = 1000


def make_run(work: str, task: str, generator: bool = False) -> str:
    """`generator`: the run also has a shift generator (one epoch: quality does not matter here)."""
    out = os.path.join(work, "output-generator" if generator else "output")
    run = os.path.join(out, task, "latest")
    if os.path.isfile(os.path.join(run, "results.json")):
        return os.path.realpath(run)
    extra = dict(generator=1, gen_epochs=1, max_stage1_examples=300) if generator else {}
    cfg = RunConfig(task_name=task, output_dir=out, stage1_epochs=1, max_epoch=1, max_users=4, **extra)
    return pipeline.run(cfg)["run_dir"]


def fill_store(run: str) -> list[str]:
    pm = PerFitModel.from_run(run, device="cpu")
    trained = [u for u in pm.store.users() if not u.startswith("bench-")]
    g = torch.Generator().manual_seed(0)
    have = set(pm.store.users())
    todo = [f"bench-{i:04d}" for i in range(N_USERS) if f"bench-{i:04d}" not in have]
    for s in range(0, len(todo), 100):
        batch = {}
        for u in todo[s: s + 100]:
            src = pm.store.get(trained[int(u[-4:]) % len(trained)])
            batch[u] = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) for k, v in src.items()}
        pm.store.put_many(batch, {u: {"items": 0, "made_by": "benchmarks/serve_load.py: a trained user's shift + noise"}
                                  for u in batch})
    return [f"bench-{i:04d}" for i in range(N_USERS)]


def run_data(run: str, task: str):
    """The run's task data (its generated data, made again if gone)."""
    cfg = json.load(open(os.path.join(run, "config.json")))
    return load_task_data(pipeline.ensure_data(RunConfig(**cfg)), task)


def phase(url: str, requests: list[dict], clients: int, seconds: float) -> dict:
    """Send requests (cycling) from `clients` threads for `seconds`; latencies of the completed ones."""
    lat, errors, lock, nxt = [], 0, threading.Lock(), [0]
    end = time.monotonic() + seconds

    def worker():
        nonlocal errors
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < end:
                with lock:
                    body = requests[nxt[0] % len(requests)]
                    nxt[0] += 1
                t0 = time.perf_counter()
                try:
                    ok = c.post(url + "/v1/generate", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors += 1

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        list(ex.map(lambda _: worker(), range(clients)))
    wall = time.monotonic() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"requests": len(lat), "rps": len(lat) / wall, "p50": q(0.5), "p99": q(0.99), "errors": errors}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max_batch_size", type=int, default=32)
    ap.add_argument("--max_wait_ms", type=float, default=20)
    ap.add_argument("--work_dir", default="/tmp/perfit-bench/serve")
    ap.add_argument("--task_name", default="movie_tagging")
    args = ap.parse_args()
    run = make_run(args.work_dir, args.task_name)
    users = fill_store(run)
    td = run_data(run, args.task_name)
    inputs = [q.input for u in td.test_users for q in u.query]
    rng = random.Random(0)
    requests = [{"user_id": rng.choice(users), "input": rng.choice(inputs)} for _ in range(5000)]
    proc, url = launch(run, "--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
                       "--device", "cpu", lifetime=4 * args.seconds + 600)
    try:
        phase(url, requests[:8], 4, 3)  # warm-up
        batched = phase(url, requests, args.clients, args.seconds)
        sequential = phase(url, requests, 1, args.seconds)
        items = td.test_users[0].profile[:20]
        t0 = time.perf_counter()
        assert httpx.post(url + "/v1/users/bench-new/history", json={"items": items}).status_code == 202
        while (st := httpx.get(url + "/v1/users/bench-new").json())["status"] not in ("ready", "failed"):
            time.sleep(0.05)
        personalize_s = time.perf_counter() - t0
        httpx.delete(url + "/v1/users/bench-new")
    finally:
        stop(proc, timeout=60)
    print(f"run {run}: {N_USERS} stored users (trained shifts + noise), {args.clients} clients, batches up to "
          f"{args.max_batch_size}, {args.max_wait_ms} ms wait, {args.seconds:.0f} s per phase, {torch.get_num_threads()} threads")
    for name, r in (("concurrent", batched), ("one at a time", sequential)):
        print(f"{name:14s} {r['requests']:6d} requests  {r['rps']:7.2f} req/s  p50 {r['p50'] * 1000:8.1f} ms  "
              f"p99 {r['p99'] * 1000:8.1f} ms  errors {r['errors']}")
    print(f"new user, 20 items: {st['status']} after {personalize_s:.1f} s (final loss {st.get('final_loss')})")
    print(f"batched_vs_sequential={batched['rps'] / sequential['rps']:.2f} errors={batched['errors'] + sequential['errors']} "
          f"personalize_s={personalize_s:.1f}")


if __name__ == "__main__":
    main()
