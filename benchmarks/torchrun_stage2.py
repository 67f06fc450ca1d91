"""Stage 2 under torchrun, timed: users per hour of `pipeline.stage2_only` (the same code `perfit stage2` runs) on
generated movie_tagging users, after a short stage 1. Launch it with torchrun (one process or several):

    torchrun --standalone --nproc_per_node=1 benchmarks/torchrun_stage2.py --random_model llama-7b --tokenizer_path TOK

--random_model builds a Llama of real widths with random weights on the device (real weights cannot travel to a
GPU box here); --model_path takes a real model. Last line (rank 0): users=<n> seconds=<stage 2 wall> users_per_hour=<x>
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import add_model_args, random_backbone, sync  # noqa: E402

from perfit import dist, pipeline  # noqa: E402
from perfit.backbone import load_backbone  # noqa: E402
from perfit.config import RunConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_users", type=int, default=64)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--user_group_size", type=int, default=32)
    ap.add_argument("--rows_per_pass", type=int, default=256)
    ap.add_argument("--output_dir", default=os.path.join(tempfile.gettempdir(), "perfit-torchrun-stage2"))
    add_model_args(ap)
    args = ap.parse_args()
    dist.setup()
    gpu = dist.local_rank() if dist.enabled() else args.cuda_device
    if args.random_model:
        backbone = random_backbone(args.random_model, args.tokenizer_path, gpu, args.dtype)
    else:
        backbone = load_backbone(args.model_path, args.dtype, gpu)
    cfg = RunConfig(task_name="movie_tagging", output_dir=args.output_dir, model_name=backbone.info.name,
                    num_users=args.num_users, history_per_user=args.history, num_other_users=4, stage1_epochs=1,
                    max_stage1_examples=64, user_group_size=args.user_group_size, rows_per_pass=args.rows_per_pass)
    pipeline.stage1_only(cfg, backbone)
    dist.barrier()
    device = next(backbone.model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    pipeline.stage2_only(cfg, backbone)
    sync(device)
    secs = time.perf_counter() - t0
    if dist.is_main():
        print(f"{backbone.info.name} {backbone.info.dtype} on {device}, {dist.world()} process(es): {args.num_users} users x "
              f"{args.history} items, 4 epochs, groups of {args.user_group_size}, {args.rows_per_pass} rows a pass")
        print(f"users={args.num_users} seconds={secs:.1f} users_per_hour={args.num_users / secs * 3600:.0f}")
    dist.teardown()


if __name__ == "__main__":
    main()
