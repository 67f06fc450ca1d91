"""Instant personalization against training, from one `perfit compare` run with the methods stage1, perfit_instant,
perfit_warm and perfit (their records: the same users, queries and machine, one run).

    perfit compare --task_name T [data flags] --methods user_majority,stage1,perfit_instant,perfit_warm,perfit --output_dir O
    python benchmarks/instant_figures.py O

Prints, on the task's primary metric (queries paired):
- recovered = (perfit_instant - stage1) / (perfit - stage1), with a bootstrap standard error over queries (2,000
  resamples, seeded), and the paired differences instant - stage1, instant - perfit, warm - perfit;
- seconds per user of each way (the stored users' own records: the generator's pass, or training) and their ratio;
- the generator's one-time cost (its features and training) and the users at which it pays for itself:
  one-time cost / (stage 2's seconds per user - instant's).
Last line: recovered=<r> recovered_se=<se> instant_vs_train_seconds=<ratio> break_even_users=<n> warm_minus_perfit=<d>
"""
from __future__ import annotations

import json
import os
import random
import sys

from perfit import metrics, pipeline
from perfit.config import CompareConfig, from_dict
from perfit.tasks import get_task


def main(out: str) -> None:
    with open(os.path.join(out, "compare_config.json")) as f:
        cfg = from_dict(CompareConfig, json.load(f))
    recs = {}
    for m in ("stage1", "perfit_instant", "perfit_warm", "perfit"):
        with open(os.path.join(out, "methods", f"{m}.json")) as f:
            recs[m] = json.load(f)
    task = get_task(cfg.task_name)
    golds = pipeline.prepare(cfg).golds
    score = {m: metrics.per_query_scores(task, golds, r["predictions"]) for m, r in recs.items()}
    ids = sorted(golds)

    def mean(m, sample):
        return sum(score[m][i] for i in sample) / len(sample)

    def recovered(sample):
        gain = mean("perfit", sample) - mean("stage1", sample)
        return (mean("perfit_instant", sample) - mean("stage1", sample)) / gain if gain else float("nan")

    rng = random.Random(0)
    boots = [recovered([rng.choice(ids) for _ in ids]) for _ in range(2000)]
    boots = [b for b in boots if b == b]
    r = recovered(ids)
    se = (sum((b - sum(boots) / len(boots)) ** 2 for b in boots) / max(len(boots) - 1, 1)) ** 0.5
    key = metrics.primary_metric(task)
    print(f"{cfg.task_name}, {len(ids)} queries of {recs['perfit']['users']} users, {key} (± one standard error):")
    for m in recs:
        print(f"  {m:15s} {recs[m]['metrics'][key]:.3f}")
    for a, b in (("perfit_instant", "stage1"), ("perfit", "stage1"), ("perfit_instant", "perfit"), ("perfit_warm", "perfit")):
        d = metrics.paired_difference(task, golds, recs[a]["predictions"], recs[b]["predictions"])
        print(f"  {a} - {b}: {d['diff']:+.3f} ± {d['se']:.3f}")
    print(f"  recovered = (instant - stage1) / (perfit - stage1) = {r:.2f} ± {se:.2f} (bootstrap over queries)")
    s_inst = recs["perfit_instant"]["train_seconds_per_user"]
    s_warm = recs["perfit_warm"]["train_seconds_per_user"]
    s_train = recs["perfit"]["train_seconds_per_user"]
    gen = recs["perfit_instant"]["settings"]["generator"]
    once = gen.get("train_seconds", 0.0)
    per = s_train - s_inst
    even = once / per if per > 0 else float("inf")
    print(f"seconds per user: instant {s_inst:.2f}, warm {s_warm:.2f} ({recs['perfit_warm']['settings']['warm_epochs']} "
          f"epochs), train {s_train:.2f} ({cfg.resolved().max_epoch} epochs): instant/train = {s_inst / s_train:.3f}")
    print(f"generator: {gen.get('users_train')} stage-1 users ({gen.get('users_held_out')} held out), {gen.get('items')} items, "
          f"{gen.get('parameters')} parameters, best epoch {gen.get('best_epoch')}/{gen.get('epochs_run')}, held-out loss "
          f"{gen.get('held_out_loss_p0', float('nan')):.4f} (P0) -> {min(x for x in gen.get('held_out_loss', [0]) if x is not None):.4f}; "
          f"one-time {once:.0f} s ({gen.get('feature_seconds', 0):.0f} s features): pays for itself after {even:.0f} users")
    d = metrics.paired_difference(task, golds, recs["perfit_warm"]["predictions"], recs["perfit"]["predictions"])
    print(f"recovered={r:.3f} recovered_se={se:.3f} instant_vs_train_seconds={s_inst / s_train:.4f} "
          f"break_even_users={even:.0f} warm_minus_perfit={d['diff']:+.3f}±{d['se']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
