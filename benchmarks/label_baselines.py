"""A finished run of a classification task (movie_tagging, news_categorize, ...) against each user's own baseline,
query by query: the user's most frequent label over its whole history (user_majority, also where a time budget
trained the shift on fewer items; a --holdout run's history without its held-out items), beside the run's stage1
and perfit answers; accuracy of each and the paired accuracy differences with their standard errors
(`perfit.metrics`).

    python benchmarks/label_baselines.py RUN_DIR DATA_DIR

DATA_DIR holds <task>/user_top_100_history.json (a run on generated data: <output_dir>/data).
Last line: perfit_minus_majority=<mean> se=<paired SE> n=<queries>
"""
from __future__ import annotations

import argparse
import json
import os

from perfit import metrics
from perfit.baselines.retrieval import most_frequent
from perfit.rundir import load_run_config
from perfit.tasks import get_task

METHODS = ("user_majority", "stage1", "perfit")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("data_dir")
    a = ap.parse_args()
    cfg = load_run_config(a.run_dir)
    task = get_task(cfg.task_name)
    with open(os.path.join(a.run_dir, "result_data_type=user_top_100_history", "user_top_100_history_all.json")) as f:
        answered = json.load(f)
    with open(os.path.join(a.data_dir, task.name, "user_top_100_history.json")) as f:
        history = {u["user_id"]: u["profile"][: len(u["profile"]) - cfg.holdout] for u in json.load(f)}
    golds: dict[str, str] = {}
    answers: dict[str, dict[str, str]] = {k: {} for k in METHODS}
    for u in answered:
        majority = most_frequent(task, history[u["user_id"]])  # compare's user_majority (ties: the latest)
        for q in u["query"]:
            golds[q["id"]] = q["gold"]
            for k, v in (("user_majority", majority), ("stage1", q.get("stage1")), ("perfit", q.get("perfit"))):
                answers[k][q["id"]] = v or ""
    for k in METHODS:
        print(f"{k:14s} accuracy {metrics.classification_metrics(task, golds, answers[k])['accuracy']:.3f}")
    out = {}
    for x, y in (("perfit", "user_majority"), ("perfit", "stage1"), ("stage1", "user_majority")):
        d = out[(x, y)] = metrics.paired_difference(task, golds, answers[x], answers[y])
        print(f"{x} - {y}: {d['diff']:+.3f} ± {d['se']:.3f} (accuracy, paired, {d['n']} queries)")
    d = out[("perfit", "user_majority")]
    print(f"perfit_minus_majority={d['diff']:.4f} se={d['se']:.4f} n={d['n']}")


if __name__ == "__main__":
    main()
