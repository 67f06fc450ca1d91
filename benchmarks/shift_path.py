"""What the one shift path saves per prefill: users' shift factors held in the bank (computed once per user and
version) against the earlier generation path, which rebuilt a Shifter for each batch (a copy of the collective shift,
each user's tensors loaded into it) and orthonormalised every user's R with a QR inside every shifted layer's hook.

Both apply the same shifts to the same [B, L, d] layer outputs of one prefill (B prompts, each its own user, the users'
shifts already on the device) through the same hook; the model's own forward is not run (it is the same for both).

    python benchmarks/shift_path.py [--hidden 4096 --layers "14;15;16" --user_rank 4 --batch 32 --prompt_len 512]

Medians of --reps interleaved timings. Last line: old_ms=<per prefill> bank_ms=<per prefill> ratio=<old / bank>
"""
from __future__ import annotations

import argparse
import statistics
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import timed  # noqa: E402

from perfit.method.bank import ShiftBank  # noqa: E402
from perfit.method.shifts import Shifter, ShiftState, position_index, shift_hook  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", default="26;27", help="the shifted layers (default: the bundled model's product preset)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--user_rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--last", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    layers = [int(x) for x in args.layers.split(";")]
    B, L = args.batch, args.prompt_len
    sh = Shifter(args.hidden, layers, args.rank, args.user_rank, B + 1, seed=0).to(dev)
    users = [sh.user_state(k + 1) for k in range(B)]
    collective = sh.spawn(1)
    idx, valid = position_index([L] * B, [0] * B, args.first, args.last)
    state = ShiftState(idx.to(dev), valid.to(dev), torch.arange(1, B + 1, device=dev), L)
    out = torch.randn(B, L, args.hidden, device=dev, dtype=dt)

    @torch.no_grad()
    def old():  # the earlier PerFitModel._decode: a Shifter per batch, users loaded, QR in each hook
        g = collective.spawn(B + 1)
        for k, t in enumerate(users):
            g.load_user_state(k + 1, t)
        g.state = state
        for l in layers:
            shift_hook(g, l)(None, None, out)

    bank = ShiftBank(collective, dev, capacity=B)
    slots = [bank.acquire(f"u{k}", "v1", lambda t=t: t) for k, t in enumerate(users)]
    bank_state = ShiftState(state.index, state.valid, torch.tensor(slots, device=dev), L)

    @torch.no_grad()
    def new():  # the bank: the users' slots held, one lookup each, factors ready
        for k in range(B):
            bank.release(bank.acquire(f"u{k}", "v1"))
        bank.state = bank_state
        for l in layers:
            shift_hook(bank, l)(None, None, out)

    timed(old, dev, 2), timed(new, dev, 2)  # warm-up
    pairs = [(timed(old, dev, 1), timed(new, dev, 1)) for _ in range(args.reps)]  # interleaved: both see the same load
    t_old, t_new = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}, {args.dtype}: d={args.hidden}, layers {layers}, ranks {args.rank}/{args.user_rank}, {B} users x "
          f"{L} tokens (f{args.first}+l{args.last}): per prefill, earlier path {t_old * 1000:.2f} ms, bank "
          f"{t_new * 1000:.2f} ms")
    print(f"old_ms={t_old * 1000:.3f} bank_ms={t_new * 1000:.3f} ratio={t_old / t_new:.2f}")


if __name__ == "__main__":
    main()
