"""New users on a live server: how fast each is `ready`, and what their personalization does to everyone else's latency.

On a run that has a shift generator (`perfit run --personalize instant+train`, or the perfit_warm run of
`perfit compare`): the server with `--personalize instant+train` and the given `--trainer`; one client sends task
queries one at a time (other users') for --seconds with nothing training (idle p50/p99); then --new_users new users post
20-item histories at once while the client goes on, until every new user's shift is refined or --max_refine_s passes.

    python benchmarks/serve_instant.py --run_dir R [--trainer process|inline] [--new_users 32] [--seconds 30]

Last line: ready_p50_s=<s> idle_p99_s=<s> busy_p99_s=<s> p99_ratio=<busy/idle> refined=<n>/<new_users>
"""
from __future__ import annotations

import argparse
import concurrent.futures
import threading
import time

import httpx

from perfit.data import load_task_data
from perfit.rundir import load_run_config
from perfit.serve.launch import launch, stop


def quantile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--trainer", default="process", choices=("process", "inline"))
    ap.add_argument("--new_users", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max_refine_s", type=float, default=300)
    args = ap.parse_args()
    from perfit import pipeline

    cfg = load_run_config(args.run_dir)
    td = load_task_data(pipeline.ensure_data(cfg), cfg.task_name)
    queries = [{"user_id": u.user_id, "input": q.input} for u in td.test_users for q in u.query]
    histories = [u.profile[:20] for u in td.test_users]
    proc, url = launch(args.run_dir, "--personalize", "instant+train", "--trainer", args.trainer, "--device", "cpu",
                       "--max_wait_ms", "0", lifetime=3 * args.seconds + args.max_refine_s + 600)
    lat: list[tuple[float, float]] = []  # (start time, latency) of the client's queries
    stop_client = threading.Event()

    def client():
        with httpx.Client(timeout=600) as c:
            k = 0
            while not stop_client.is_set():
                t0 = time.perf_counter()
                assert c.post(url + "/v1/generate", json=queries[k % len(queries)]).status_code == 200
                lat.append((t0, time.perf_counter() - t0))
                k += 1

    try:
        with httpx.Client(timeout=600) as c:
            c.post(url + "/v1/generate", json=queries[0])  # warm-up
        th = threading.Thread(target=client)
        th.start()
        time.sleep(args.seconds)
        idle = [x for _, x in lat]
        t_busy = time.perf_counter()
        users = [f"new-{i:03d}" for i in range(args.new_users)]

        def post(i):
            t0 = time.perf_counter()
            r = httpx.post(url + f"/v1/users/{users[i]}/history", json={"items": histories[i % len(histories)]},
                           timeout=600)
            return time.perf_counter() - t0, r.json()

        with concurrent.futures.ThreadPoolExecutor(args.new_users) as ex:
            posted = list(ex.map(post, range(args.new_users)))
        end, refined = time.perf_counter() + args.max_refine_s, 0
        while time.perf_counter() < end:
            sts = [httpx.get(url + f"/v1/users/{u}").json() for u in users]
            refined = sum(s.get("mode") == "instant+train" for s in sts)
            if refined == len(users):
                break
            time.sleep(1.0)
        t_done = time.perf_counter()
        time.sleep(1.0)
        stop_client.set()
        th.join()
        busy = [x for t, x in lat if t_busy <= t <= t_done]
        for u in users:  # the run is left as it was: a rerun measures the same thing
            httpx.delete(url + f"/v1/users/{u}", timeout=600)
    finally:
        stop(proc, timeout=60)
    ready = [s for s, _ in posted]
    print(f"run {args.run_dir}, trainer {args.trainer}: {args.new_users} new users x 20 items posted at once")
    print(f"posts: ready in reply {sum(r.get('status') == 'ready' for _, r in posted)}/{len(posted)}, "
          f"p50 {quantile(ready, 0.5):.2f} s, max {max(ready):.2f} s")
    print(f"client, nothing training: {len(idle)} queries, p50 {quantile(idle, 0.5):.3f} s, p99 {quantile(idle, 0.99):.3f} s")
    print(f"client, while they personalize ({t_done - t_busy:.0f} s): {len(busy)} queries, p50 {quantile(busy, 0.5):.3f} s, "
          f"p99 {quantile(busy, 0.99):.3f} s, max {max(busy, default=float('nan')):.3f} s")
    print(f"ready_p50_s={quantile(ready, 0.5):.2f} idle_p99_s={quantile(idle, 0.99):.3f} "
          f"busy_p99_s={quantile(busy, 0.99):.3f} p99_ratio={quantile(busy, 0.99) / quantile(idle, 0.99):.2f} "
          f"refined={refined}/{args.new_users}")


if __name__ == "__main__":
    main()
