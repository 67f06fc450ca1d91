"""Why personal shifts gain little on headlines: read a finished `perfit compare` folder for news_headline.

Prints, on its test queries: each method's ROUGE-1 with mean precision, recall and length; what copying the
article's first N words scores; and, for the users named, their per-method scores and how well their own stored
shift (and stage 1 alone) reproduces the titles of their latest training items.

    python benchmarks/headline_fit.py study/nh_test_mh --users hp3u14,hp3u23 --train_items 20

Run it from the folder `perfit compare` ran in (compare_config.json holds paths relative to it)."""
from __future__ import annotations

import argparse
import json
import os
import statistics

from rouge_score import rouge_scorer

from perfit import metrics, pipeline
from perfit.config import CompareConfig, load_config_file
from perfit.model import PerFitModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dir", help="a `perfit compare --task_name news_headline` output folder")
    ap.add_argument("--users", default="", help="comma-separated test user ids to look at one by one")
    ap.add_argument("--train_items", type=int, default=20, help="latest training items per named user to regenerate")
    a = ap.parse_args()
    cfg = CompareConfig(**load_config_file(os.path.join(a.compare_dir, "compare_config.json"), CompareConfig))
    exp = pipeline.prepare(cfg)
    task, golds = exp.data.task, exp.golds
    if task.is_classification:
        raise SystemExit(f"{a.compare_dir}: task {task.name} is not news_headline")
    mdir = os.path.join(a.compare_dir, "methods")
    preds = {}
    for fn in sorted(os.listdir(mdir)):
        rec = json.load(open(os.path.join(mdir, fn)))
        preds[rec["method"]] = rec["predictions"]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)  # as metrics does: no stemming
    mean = statistics.mean

    def pr(p: dict[str, str]) -> tuple[float, float]:
        s = [scorer.score(golds[i], p[i])["rouge1"] for i in golds]
        return mean(x.precision for x in s), mean(x.recall for x in s)

    print(f"{len(golds)} queries; gold titles {mean(len(g.split()) for g in golds.values()):.1f} words")
    for m, p in preds.items():
        f = metrics.evaluate(task, golds, p)
        prec, rec = pr(p)
        print(f"{m:15s} rouge-1 {f['rouge-1']:.3f} ± {f['rouge-1_se']:.3f}  precision {prec:.3f}  recall {rec:.3f}  "
              f"{mean(len(p[i].split()) for i in golds):.1f} words")
    texts = {q.id: exp.builder.query_prompt(q.input) for u in exp.data.test_users for q in u.query}
    for n in (10, 15):
        first = {i: " ".join(texts[i].split("article:", 1)[-1].rsplit("headline:", 1)[0].split()[:n]) for i in golds}
        print(f"first {n} words of the article: rouge-1 {metrics.evaluate(task, golds, first)['rouge-1']:.3f}")

    named = [u for u in exp.data.test_users if u.user_id in set(filter(None, a.users.split(",")))]
    if not named:
        return
    pm = PerFitModel.from_run(exp.run_dir)
    for u in named:
        ids = [q.id for q in u.query]
        on_test = {m: metrics.evaluate(task, {i: golds[i] for i in ids}, {i: p[i] for i in ids})["rouge-1"]
                   for m, p in preds.items()}
        print(u.user_id, "test queries:", " ".join(f"{m} {v:.3f}" for m, v in on_test.items()))
        items = pipeline.history_items(cfg, u)[-a.train_items:]
        own = {str(k): it["title"] for k, it in enumerate(items)}
        for variant in ("stage1", "perfit"):
            out = pm.generate([u.user_id] * len(items), [exp.builder.prompt(it) for it in items], variant=variant)
            fit = metrics.evaluate(task, own, {str(k): t for k, t in enumerate(out)})["rouge-1"]
            print(f"{u.user_id} {variant}: rouge-1 {fit:.3f} against the titles of its latest {len(items)} training items")


if __name__ == "__main__":
    main()
