"""A finished product_rating run against each user's own baselines, query by query: the user's most frequent score
and its (rounded) mean score over its history, beside the run's stage1 and perfit answers; MAE and RMSE of each and
the paired MAE differences with their standard errors. With --holdout K (a run made with --holdout K) the baselines
read each user's history without its last K items, as the run did.

    python benchmarks/rating_baselines.py RUN_DIR DATA_DIR [--holdout K]
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("data_dir")
    ap.add_argument("--holdout", type=int, default=0)
    a = ap.parse_args()
    with open(os.path.join(a.run_dir, "result_data_type=user_top_100_history", "user_top_100_history_all.json")) as f:
        answered = json.load(f)
    with open(os.path.join(a.data_dir, "product_rating", "user_top_100_history.json")) as f:
        history = {u["user_id"]: u["profile"][: len(u["profile"]) - a.holdout] for u in json.load(f)}

    def number(x):
        try:
            return float(x)
        except (TypeError, ValueError):
            return None

    rows = []
    for u in answered:
        scores = [float(it["score"]) for it in history[u["user_id"]]]
        most = float(Counter(scores).most_common(1)[0][0])
        for q in u["query"]:
            rows.append({"gold": float(q["gold"]), "most_frequent": most, "mean": float(round(sum(scores) / len(scores))),
                         "stage1": number(q.get("stage1")), "perfit": number(q.get("perfit"))})
    n = len(rows)

    def err(r, k):  # an answer that is not a number counts as the middle of the scale
        return abs(r["gold"] - (r[k] if r[k] is not None else 3.0))

    for k in ("most_frequent", "mean", "stage1", "perfit"):
        print(f"{k:13s} MAE {sum(err(r, k) for r in rows) / n:.3f}  RMSE {math.sqrt(sum(err(r, k) ** 2 for r in rows) / n):.3f}")
    for x, y in (("perfit", "most_frequent"), ("perfit", "stage1"), ("stage1", "most_frequent")):
        d = [err(r, x) - err(r, y) for r in rows]
        m = sum(d) / n
        se = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1) / n)
        print(f"{x} - {y}: {m:+.3f} ± {se:.3f} (MAE, paired, {n} queries)")


if __name__ == "__main__":
    main()
