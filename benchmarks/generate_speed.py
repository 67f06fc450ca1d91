"""Mixed-user personalized generation against the base model generating the same prompts with no shift.

32 users' queries go through one greedy decoder in mixed batches, each row with its own personal shift (plus the
collective one); the baseline is the same decoder with no shift at all. Both run a batch's shared prompt prefix once,
but where a shift acts inside the prefix (an `f` group) the personalized decoder runs it from the lowest shifted
layer up once per user in the batch; a third line times the base decoder without prefix sharing, for reference.
All generate exactly --new_tokens tokens per query (no early stop), so throughput is like for like.

    python benchmarks/generate_speed.py [--task_name movie_tagging] [--num_users 32] [--new_tokens 8]

Last line: personalized_vs_base=<personalized throughput / base throughput>
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import add_model_args, setup, sync  # noqa: E402

from perfit.generate import greedy_generate  # noqa: E402
from perfit.method.shifts import Shifter, parse_positions  # noqa: E402
from perfit.batching import tokenize_prompt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task_name", default="movie_tagging")
    ap.add_argument("--num_users", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    add_model_args(ap)
    args = ap.parse_args()
    cfg, td, model, tok, info, _ = setup(args.task_name, args.num_users, 4, args)
    device = next(model.parameters()).device
    first, last = parse_positions(cfg.positions)
    prompts, owners = [], []
    for k, u in enumerate(td.test_users):
        for q in u.query:
            prompts.append(tokenize_prompt(tok, q.input, cfg.max_length))
            owners.append(k)
    sh = Shifter(info.hidden_size, cfg.layers, cfg.low_rank_dimension, cfg.user_low_rank_dimension, args.num_users, cfg.seed)
    sh.to(device)
    kw = dict(max_new_tokens=args.new_tokens, batch_size=args.batch_size, stop_early=False)

    def timed(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    base = timed(lambda: greedy_generate(model, tok, prompts, **kw))
    plain = timed(lambda: greedy_generate(model, tok, prompts, share_prefix=False, **kw))
    with sh.attached(model):
        pers = timed(lambda: greedy_generate(model, tok, prompts, owners, sh, first=first, last=last, **kw))
    n_tok = len(prompts) * args.new_tokens
    print(f"task={args.task_name} users={args.num_users} queries={len(prompts)} new_tokens={args.new_tokens} device={device} dtype={info.dtype}")
    print(f"base, no prefix sharing     {plain:8.2f} s  {n_tok / plain:8.1f} tokens/s  {len(prompts) / plain:7.2f} queries/s")
    print(f"base (no shift)             {base:8.2f} s  {n_tok / base:8.1f} tokens/s  {len(prompts) / base:7.2f} queries/s")
    print(f"personalized (mixed users)  {pers:8.2f} s  {n_tok / pers:8.1f} tokens/s  {len(prompts) / pers:7.2f} queries/s")
    print(f"personalized_vs_base={base / pers:.3f}")


if __name__ == "__main__":
    main()
