"""Streaming validation of a large user_others.json: throughput and peak memory.

Writes a generated movie_tagging folder whose user_others.json is about --gigabytes GB (users of --items items,
descriptions of realistic length, written user by user), then runs `perfit validate-data` on it in a fresh process
(parse with ijson, validate every user and item, count) and reports its wall time and peak resident memory.

    python benchmarks/data_stream.py [--gigabytes 1.0] [--dir /tmp/perfit-stream]

Last line: mb_per_s=<MB of JSON validated per second> peak_rss_mb=<peak RSS of the validating process>
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

from perfit.data.synthetic import MOVIE_VOCAB, generate


def write_others(path: str, target_bytes: int, items: int, seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    words = [w for v in MOVIE_VOCAB.values() for p in v for w in p.split()]
    tags = list(MOVIE_VOCAB)
    n_users = written = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("[")
        while written < target_bytes:
            u = {"user_id": f"other{n_users:07d}",
                 "profile": [{"id": f"{n_users}-{k}", "description": " ".join(rng.choices(words, k=rng.randint(40, 90))),
                              "tag": rng.choice(tags), "date": "2020-01-01"} for k in range(items)],
                 "query": [{"id": f"q{n_users}", "input": "description: " + " ".join(rng.choices(words, k=30)) + " tag:",
                            "gold": rng.choice(tags)}]}
            s = ("," if n_users else "") + "\n" + json.dumps(u)
            f.write(s)
            written += len(s)
            n_users += 1
        f.write("\n]\n")
    os.replace(path + ".tmp", path)
    return n_users, os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gigabytes", type=float, default=1.0)
    ap.add_argument("--items", type=int, default=100, help="history items per other user")
    ap.add_argument("--dir", default="/tmp/perfit-stream")
    args = ap.parse_args()
    task = "movie_tagging"
    others = os.path.join(args.dir, task, "user_others.json")
    target = int(args.gigabytes * 1e9)
    if not (os.path.isfile(others) and abs(os.path.getsize(others) - target) < 0.01 * target):
        generate(task, args.dir, num_users=20, num_other_users=0, seed=0)
        t0 = time.perf_counter()
        n, size = write_others(others, target, args.items)
        print(f"wrote {others}: {n} users, {size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s", flush=True)
    size = os.path.getsize(others)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "perfit.cli", "validate-data", "--task_name", task, "--data_dir", args.dir],
                         stdout=subprocess.PIPE, text=True, check=True)
    secs = time.perf_counter() - t0
    summary = json.loads(res.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"validated {size / 1e6:.0f} MB: {summary['other_users']} other users, {summary['other_examples']} examples, "
          f"{secs:.1f} s (process start included)")
    print(f"mb_per_s={size / 1e6 / secs:.1f} peak_rss_mb={peak:.0f}")


if __name__ == "__main__":
    main()
