"""Probe behind the README's query-cue figures: the stage-1 shift and personal shifts stored by a `perfit compare`
run, predicting the same test queries as given and with the template's answer cue appended.

    python scripts/query_cue_probe.py RUN_DIR CUE      # e.g. output/compare/news_categorize/<run_dir> " category:"

The run's own config (queries as given: query_cue 0) says everything else.
"""
import dataclasses
import sys

from perfit import PerFitModel, metrics, pipeline

run_dir, cue = sys.argv[1], sys.argv[2]
pm = PerFitModel.from_run(run_dir)
exp = pipeline.prepare(dataclasses.replace(pm.cfg, query_cue=0), run_dir=run_dir)
qids, owners, inputs = exp.queries
for variant, texts in (("as_given", inputs), ("with_cue", [t + cue for t in inputs])):
    for v in ("stage1", "perfit"):
        preds = dict(zip(qids, pm.generate(owners, texts, variant=v)))
        print(exp.data.task.name, run_dir, variant, v, metrics.evaluate(exp.data.task, exp.golds, preds),
              list(preds.values())[:4], flush=True)
