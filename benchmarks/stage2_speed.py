"""Stage-2 training speed: the one-user-at-a-time reference loop against PerFit's batched, cached path.

(a) reference: like the per-user loops of OPPU/pyreft: one user after another, the whole frozen model run over
    every example on every epoch, logits over the whole sequence and vocabulary, HF-style masked loss, AdamW.
(b) perfit: all users in one batched loop (perfit.train.train_shifts): frozen lower layers computed once,
    shared instruction prefix run once per user and step, logits at target positions only.
floor: one no-grad forward of the frozen decoder over all history examples, once.
Same model, data, preset, batch size, epochs and learning rate for (a) and (b). Each part runs in its own process.

    python benchmarks/stage2_speed.py --task_name movie_tagging [--num_users 32] [--ref_users 4]

(a) is timed on --ref_users users and scaled to all users (each user has the same number of examples).
Last line: speedup=<a_time/b_time> floor_ratio=<b_time/floor_time>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import add_model_args, model_argv, peak_bytes, run_part, setup, sync  # noqa: E402

from perfit.method.shifts import Shifter, ShiftState, parse_positions  # noqa: E402
from perfit.train import train_shifts  # noqa: E402
from perfit.batching import make_batch  # noqa: E402


def reference(model, tok, ex, cfg, users: int, hidden: int) -> float:
    first, last = parse_positions(cfg.positions)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for u in range(users):
        mine = [e for e in ex if e.module == u]
        sh = Shifter(hidden, cfg.layers, cfg.low_rank_dimension, cfg.user_low_rank_dimension, 1, cfg.seed).to(device)
        for p in sh.personal.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(sh.personal.parameters(), lr=cfg.user_lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(u)
        with sh.attached(model):
            _reference_user(model, tok, mine, cfg, sh, opt, g, first, last, device)
    sync(device)
    return time.perf_counter() - t0


def _reference_user(model, tok, mine, cfg, sh, opt, g, first, last, device) -> None:
    """One user's plain loop: the whole model over every example, every epoch, HF-style masked loss."""
    for _ in range(cfg.max_epoch):
        order = torch.randperm(len(mine), generator=g).tolist()
        for s in range(0, len(order), cfg.batch_size):
            rows = [mine[i] for i in order[s: s + cfg.batch_size]]
            b = make_batch([r.ids for r in rows], [r.prompt_len for r in rows], [0] * len(rows), tok.pad_token_id, first, last).to(device)
            labels = torch.full_like(b.input_ids, -100)
            for i, (r, off) in enumerate(zip(rows, b.offsets)):
                labels[i, off + r.prompt_len:] = torch.tensor(r.ids[r.prompt_len:])
            with sh.active(ShiftState(b.shift_index, b.shift_valid, b.users, b.input_ids.shape[1])):
                loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def floor(model, tok, ex, cfg) -> float:
    device = next(model.parameters()).device
    order = sorted(range(len(ex)), key=lambda i: len(ex[i].ids))
    t0 = time.perf_counter()
    for s in range(0, len(order), cfg.batch_size):
        rows = [ex[i] for i in order[s: s + cfg.batch_size]]
        b = make_batch([r.ids for r in rows], [r.prompt_len for r in rows], [0] * len(rows), tok.pad_token_id, 1, 0).to(device)
        model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
    sync(device)
    return time.perf_counter() - t0


def part(args) -> dict:
    torch.manual_seed(0)
    cfg, td, model, tok, info, ex = setup(args.task_name, args.num_users, args.history, args)
    device = next(model.parameters()).device
    floor(model, tok, ex[: cfg.batch_size], cfg)  # warm-up (CUDA context, kernels) before any timing
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_bytes(device, peak=False)
    if args.part == "a":
        secs = reference(model, tok, ex, cfg, args.ref_users, info.hidden_size) * args.num_users / args.ref_users
    elif args.part == "b":
        first, last = parse_positions(cfg.positions)
        sh = Shifter(info.hidden_size, cfg.layers, cfg.low_rank_dimension, cfg.user_low_rank_dimension, args.num_users, cfg.seed)
        sh.set_all_personal(sh)
        with sh.to(device).attached(model):
            secs = train_shifts(model, sh, ex, epochs=cfg.max_epoch, batch_size=cfg.batch_size, lr=cfg.user_lr, train_collective=False,
                                pad_id=tok.pad_token_id, first=first, last=last, seed=cfg.seed, max_rows=args.rows_per_pass,
                                desc="perfit stage 2").seconds
    else:
        secs = floor(model, tok, ex, cfg)
    return {"seconds": secs, "peak_bytes": peak_bytes(device), "base_bytes": base, "examples": len(ex),
            "device": str(device), "dtype": info.dtype}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task_name", default="movie_tagging")
    ap.add_argument("--num_users", type=int, default=32)
    ap.add_argument("--history", type=int, default=20, help="history items per user")
    ap.add_argument("--ref_users", type=int, default=4, help="users the reference loop is timed on (scaled to all)")
    ap.add_argument("--rows_per_pass", type=int, default=32, help="(b): rows per forward pass (RunConfig.rows_per_pass)")
    add_model_args(ap)
    ap.add_argument("--part", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(part(args)))
        return
    common = ["--task_name", args.task_name, "--num_users", str(args.num_users), "--history", str(args.history),
              "--ref_users", str(args.ref_users), "--rows_per_pass", str(args.rows_per_pass)] + model_argv(args)
    res = {p: run_part(__file__, common + ["--part", p]) for p in ("floor", "b", "a")}
    a, b, f = res["a"]["seconds"], res["b"]["seconds"], res["floor"]["seconds"]
    print(f"task={args.task_name} users={args.num_users} examples={res['b']['examples']} device={res['b']['device']} dtype={res['b']['dtype']}")
    for name, key in (("(a) one user at a time, full recompute", "a"), ("(b) perfit batched + cached", "b"), ("floor: one no-grad forward", "floor")):
        r = res[key]
        extra = (r["peak_bytes"] - r["base_bytes"]) / 2**20
        uph = args.num_users / r["seconds"] * 3600 if key != "floor" else float("nan")
        print(f"{name:42s} {r['seconds']:9.1f} s  users/hour {uph:9.1f}  peak {r['peak_bytes'] / 2**20:8.0f} MiB (+{extra:.0f} MiB over the loaded model)")
    print(f"speedup={a / b:.2f} floor_ratio={b / f:.2f}")


if __name__ == "__main__":
    main()
