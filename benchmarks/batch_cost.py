"""Where a serving batch's time goes: one batch of 32 queries of 32 distinct users against the same queries one at a
time, 32 queries of a single user, and no shift at all, through `PerFitModel.generate`, with 1 and with the task's
answer length of new tokens; optionally the share of matrix products in one batch (torch profiler).

    python benchmarks/batch_cost.py --run_dir /tmp/perfit-bench/serve/output/movie_tagging/latest [--profile]

The runs `benchmarks/serve_load.py` makes (with 1,000 stored users `bench-NNNN`) are the intended input.
Last line: batch_ms_per_query=<32 distinct users, answer length> alone_ms_per_query=<one at a time, answer length>
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # one bar per generate call would drown the table

import torch  # noqa: E402

from perfit import PerFitModel, pipeline  # noqa: E402
from perfit.train.cost import fastest  # noqa: E402


def best(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    return fastest(fn, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--profile", action="store_true", help="also: the share of aten::mm in one batch of 32 users")
    args = ap.parse_args()
    run = os.path.realpath(args.run_dir)
    pm = PerFitModel.from_run(run, device="cpu")
    exp = pipeline.prepare(dataclasses.replace(pm.cfg, max_users=0), run)  # every test user's queries, not the run's few
    inputs = [q.input for u in exp.data.test_users for q in u.query][:32]
    users = [u for u in pm.store.users() if u.startswith("bench-")][:32] or pm.store.users()[:32]
    n = len(inputs)
    users = (users * n)[:n]
    prompt_tokens = sum(map(len, pm.prompt_ids(inputs))) / n
    print(f"{pm.task.name}: {n} queries ({prompt_tokens:.0f} prompt tokens on average), {len(set(users))} distinct users, "
          f"{torch.get_num_threads()} threads, best of 2")
    assert n == 32, f"{n} queries: the run's data has fewer than 32 test queries"
    for mnt in (1, pm.task.max_new_tokens):
        batch = best(lambda: pm.generate(users[:n], inputs, max_new_tokens=mnt))
        alone = best(lambda: [pm.generate([users[i]], [inputs[i]], max_new_tokens=mnt) for i in range(4)]) / 4
        one_user = best(lambda: pm.generate([users[0]] * n, inputs, max_new_tokens=mnt))
        bare = best(lambda: pm.generate(users[:n], inputs, max_new_tokens=mnt, variant="zero_shot"))
        print(f"{mnt:2d} new tokens: one at a time {alone * 1000:6.0f} ms a query | {n} distinct users in one batch "
              f"{batch:5.2f} s ({batch / n * 1000:4.0f} ms a query) | {n} queries of one user {one_user:5.2f} s | "
              f"no shift {bare:5.2f} s")
    if args.profile:
        with torch.autograd.profiler.profile() as prof:
            t0 = time.perf_counter()
            pm.generate(users[:n], inputs)
            wall = time.perf_counter() - t0
        mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::mm") / 1e6
        print(f"profiled batch: {wall:.2f} s, of which aten::mm {mm:.2f} s")
    print(f"batch_ms_per_query={batch / n * 1000:.0f} alone_ms_per_query={alone * 1000:.0f}")


if __name__ == "__main__":
    main()
