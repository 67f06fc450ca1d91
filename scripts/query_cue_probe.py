"""Probe behind the README's query-cue figures: the stage-1 shift and personal shifts stored by a `perfit compare`
run, predicting the same test queries as given and with the template's answer cue appended.

    python scripts/query_cue_probe.py TASK RUN_DIR_NAME CUE      # e.g. news_categorize zero_init " category:"

It reads output/compare/TASK/compare_config.json (the run's settings) and that run's checkpoints.
"""
import dataclasses
import json
import os
import sys

from perfit import metrics, pipeline
from perfit.config import CompareConfig, from_dict
from perfit.data import Query, User
from perfit.store import UserStore

task, run_dir_name, cue = sys.argv[1], sys.argv[2], sys.argv[3]
with open(f"output/compare/{task}/compare_config.json", encoding="utf-8") as f:
    cfg = from_dict(CompareConfig, json.load(f))
# the shifts were trained with queries as given (query_cue 0)
cfg = dataclasses.replace(cfg, run_dir_name=run_dir_name, query_cue=0,
                          shift_init="zero" if run_dir_name == "zero_init" else "loreft")
ctx = pipeline.prepare(cfg)
stage1, _ = pipeline.load_stage1(os.path.join(ctx.run_dir, "task_reft", "ckpt"), ctx.model)
store = UserStore(os.path.join(ctx.run_dir, "users"))
for variant in ("as_given", "with_cue"):
    if variant == "with_cue":
        ctx.data.test_users = [User(u.user_id, u.profile, [Query(q.id, q.input + cue, q.gold) for q in u.query])
                               for u in ctx.data.test_users]
    for v, preds in pipeline.predict_variants(ctx, stage1, store, ["stage1", "perfit"]).items():
        print(task, run_dir_name, variant, v, metrics.evaluate(ctx.data.task, {k: ctx.data.golds[k] for k in preds}, preds),
              list(preds.values())[:4], flush=True)
