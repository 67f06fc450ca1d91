"""The user store at scale: --users random shifts of the movie_tagging preset size (SmolLM2-135M: 2 layers, rank 4,
hidden 576: 9,224 float32 parameters, 36,896 bytes), written in groups of 1,000 (one transaction each), then single
random users loaded from the store opened afresh: first with the file as the write left it (cold: in a sandboxed VM
the first touch of each file page is fetched from the host), then once the file has been read through once (warm: the
state of a serving process after a while, or of a machine whose page cache holds the file).

    python benchmarks/store_scale.py [--users 100000] [--path /tmp/perfit-store-scale.sqlite]

Last line: users=<n> bytes_per_user=<file bytes / users> load_p99_ms=<p99 of one user's load, ms>
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch

from perfit.store import UserStore

LAYERS, HIDDEN, RANK = (14, 15), 576, 4


def shift(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"layer.{l}.{n}": torch.randn(shape, generator=g) for l in LAYERS
            for n, shape in (("rotate_raw", (HIDDEN, RANK)), ("weight", (RANK, HIDDEN)), ("bias", (RANK,)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--path", default="/tmp/perfit-store-scale.sqlite")
    ap.add_argument("--loads", type=int, default=2000)
    args = ap.parse_args()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(args.path + suffix):
            os.unlink(args.path + suffix)
    g = torch.Generator().manual_seed(0)
    raw = sum(t.numel() * t.element_size() for t in shift(g).values())
    store = UserStore(args.path, {"key": "store_scale", "settings": {"layers": list(LAYERS), "rank": RANK}})
    t0 = time.perf_counter()
    for s in range(0, args.users, 1000):
        store.put_many({f"user-{i:06d}": shift(g) for i in range(s, min(s + 1000, args.users))},
                       {f"user-{i:06d}": {"items": 20} for i in range(s, min(s + 1000, args.users))})
    write_s = time.perf_counter() - t0
    disk = store.disk_bytes()
    def loads(seed: int) -> tuple[float, float]:
        store = UserStore(args.path)  # opened afresh, as a server would
        store.get("user-000000")
        rng, lat = random.Random(seed), []
        for _ in range(args.loads):
            uid = f"user-{rng.randrange(args.users):06d}"
            t0 = time.perf_counter()
            t = store.get(uid)
            lat.append((time.perf_counter() - t0) * 1000)
            assert t["layer.14.weight"].shape == (RANK, HIDDEN)
        lat.sort()
        return lat[len(lat) // 2], lat[int(0.99 * len(lat))]

    cold50, cold99 = loads(0)
    with open(args.path, "rb") as f:  # read the file through once
        while f.read(1 << 24):
            pass
    p50, p99 = loads(1)
    print(f"{args.users} users written in {write_s:.1f} s ({args.users / write_s:.0f} users/s, groups of 1,000 per transaction)")
    print(f"on disk {disk / 1e6:.1f} MB: {disk / args.users:.0f} bytes per user against {raw} bytes of raw tensors "
          f"({(disk / args.users / raw - 1) * 100:+.1f}%)")
    print(f"load one random user ({args.loads} loads), cold file: p50 {cold50:.3f} ms, p99 {cold99:.3f} ms")
    print(f"load one random user ({args.loads} other users), file read once before: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    print(f"users={args.users} bytes_per_user={disk / args.users:.0f} load_p99_ms={p99:.3f}")


if __name__ == "__main__":
    main()
