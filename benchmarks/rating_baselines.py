"""A finished product_rating run against each user's own baselines, query by query: the user's most frequent score
and its (rounded) mean score over its history, beside the run's stage1 and perfit answers; MAE and RMSE of each and
the paired MAE differences with their standard errors, scored by `perfit.metrics` (an answer that is not a number
reads as LaMP reads it). With --holdout K (a run made with --holdout K) the baselines read each user's history
without its last K items, as the run did.

    python benchmarks/rating_baselines.py RUN_DIR DATA_DIR [--holdout K]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from perfit import metrics
from perfit.tasks import get_task

METHODS = ("most_frequent", "mean", "stage1", "perfit")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("data_dir")
    ap.add_argument("--holdout", type=int, default=0)
    a = ap.parse_args()
    task = get_task("product_rating")
    with open(os.path.join(a.run_dir, "result_data_type=user_top_100_history", "user_top_100_history_all.json")) as f:
        answered = json.load(f)
    with open(os.path.join(a.data_dir, "product_rating", "user_top_100_history.json")) as f:
        history = {u["user_id"]: u["profile"][: len(u["profile"]) - a.holdout] for u in json.load(f)}
    golds: dict[str, str] = {}
    answers: dict[str, dict[str, str]] = {k: {} for k in METHODS}
    for u in answered:
        scores = [float(it["score"]) for it in history[u["user_id"]]]
        most = Counter(scores).most_common(1)[0][0]
        for q in u["query"]:
            golds[q["id"]] = str(q["gold"])
            for k, v in (("most_frequent", most), ("mean", round(sum(scores) / len(scores))),
                         ("stage1", q.get("stage1")), ("perfit", q.get("perfit"))):
                answers[k][q["id"]] = "" if v is None else str(v)
    for k in METHODS:
        m = metrics.rating_metrics(task, golds, answers[k])
        print(f"{k:13s} MAE {m['mae']:.3f}  RMSE {m['rmse']:.3f}  (not a number: {m['invalid']})")
    for x, y in (("perfit", "most_frequent"), ("perfit", "stage1"), ("stage1", "most_frequent")):
        d = metrics.paired_difference(task, golds, answers[x], answers[y])
        print(f"{x} - {y}: {d['diff']:+.3f} ± {d['se']:.3f} (MAE, paired, {d['n']} queries)")


if __name__ == "__main__":
    main()
