"""Does the score mapping lose what the shifts learned? A finished product_rating run's test (or held-out) queries
read three ways from the model's own distribution over the five scores, each for stage1 and perfit: the most likely
score (what greedy decoding answers when its first token is the scores' common prefix), the median score (the answer
that minimises the expected absolute error, so MAE, if the distribution is calibrated) and the rounded mean score.
A ceiling for what a personal shift could add to stage 1 here: stage 1's distribution times the user's own score
frequencies (add-one smoothed) over the stage-1 users' (Bayes' rule for p(score | review, user) if the review and the
user were independent given the score), read by its median. Beside them the user's most frequent score over the history the run held (after its --max_history or --holdout);
MAE of each and paired differences.

    python benchmarks/rating_readout.py RUN_DIR [--batch 8]

Each query's distribution comes from one prefill with the shifts (as `generate` applies them: on the prompt's
positions only) and, where the scores share a leading token (" " on SmolLM2's tokenizer), one unshifted decoding step
of that token, so the scores' probabilities are exact, not an approximation. Reads the run's own queries: with a
run made with --holdout K, each user's last K history items.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from perfit import metrics, pipeline
from perfit.baselines.retrieval import most_frequent
from perfit.model import PerFitModel
from perfit.rundir import load_run_config


def label_tokens(tok, labels):
    """(common leading token ids, one distinct last token id per label); an error when the labels differ elsewhere."""
    ids = [tok(" " + lab, add_special_tokens=False)["input_ids"] for lab in labels]
    head = ids[0][:-1]
    if any(i[:-1] != head for i in ids) or len({i[-1] for i in ids}) != len(ids):
        raise SystemExit(f"the scores {labels} do not tokenize as a common prefix and one distinct token each: {ids}")
    return head, [i[-1] for i in ids]


@torch.no_grad()
def distributions(pm: PerFitModel, users, prompts, head, last_ids, variant):
    """Probabilities of each label (renormalised over the labels) and the labels' share of the whole next-token mass."""
    tok = pm.tok
    tok.padding_side = "left"
    ids = pm.prompt_ids(prompts)
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    x = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=pm.device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=pm.device)
    rows = [None] * len(users) if variant == "stage1" else list(users)
    with pm.shifted(rows) as model:
        out = model(input_ids=x, attention_mask=mask, use_cache=True)
    logits, past = out.logits[:, -1].float(), out.past_key_values
    for t in head:  # the scores' common leading token, decoded as generate does: no shift on generated tokens
        step = torch.full((len(ids), 1), t, device=pm.device)
        mask = torch.cat([mask, torch.ones_like(step)], 1)
        out = pm.model(input_ids=step, attention_mask=mask, past_key_values=past, use_cache=True)
        logits, past = out.logits[:, -1].float(), out.past_key_values
    p = logits.softmax(-1)[:, last_ids]
    return (p / p.sum(-1, keepdim=True)).cpu(), p.sum(-1).cpu()


def readouts(p, values):
    v = torch.tensor(values)
    cdf = p.cumsum(-1)
    return {"argmax": v[p.argmax(-1)], "median": v[(cdf < 0.5).sum(-1).clamp(max=len(values) - 1)],
            "mean": (p * v).sum(-1).round()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    cfg = load_run_config(a.run_dir)
    exp = pipeline.prepare(cfg, a.run_dir)
    pm = PerFitModel.from_run(a.run_dir)
    if pm.task.metric_kind != "rating":
        raise SystemExit(f"{a.run_dir}: a {pm.task.name} run; this reads product_rating runs")
    labels = list(pm.task.labels)
    values = [float(x) for x in labels]
    head, last_ids = label_tokens(pm.tok, labels)
    qs = [(u, q) for u in exp.data.test_users for q in u.query]
    golds = exp.golds
    ids = [q.id for _, q in qs]
    # each readout's answers as the run's predictions are kept: {query id: answer}, scored by perfit.metrics
    preds = {"most_frequent": {q.id: most_frequent(pm.task, u.profile) for u, q in qs}}

    def answers(values_per_query):
        return {i: f"{float(x):g}" for i, x in zip(ids, values_per_query)}

    def freq(items):
        return torch.tensor([1.0 + sum(str(it["score"]) == lab for it in items) for lab in labels])

    with open(os.path.join(cfg.data_dir or os.path.join(cfg.output_dir, "data"), pm.task.name, "user_others.json")) as f:
        base = freq([it for u in json.load(f) for it in u["profile"]])
    base = base / base.sum()
    user_prior = torch.stack([f / f.sum() for f in (freq(u.profile) for u, _ in qs)])
    for variant in ("stage1", "perfit"):
        ps, mass = [], []
        for s in range(0, len(qs), a.batch):
            chunk = qs[s: s + a.batch]
            p, m = distributions(pm, [u.user_id for u, _ in chunk], [q.input for _, q in chunk], head, last_ids,
                                 variant)
            ps.append(p)
            mass.append(m)
        p, mass = torch.cat(ps), torch.cat(mass)
        print(f"{variant}: the scores hold {mass.mean():.3f} of the next-token mass on average (min {mass.min():.3f}); "
              f"mean distribution {[round(x, 3) for x in p.mean(0).tolist()]}")
        for k, pred in readouts(p, values).items():
            preds[f"{variant}_{k}"] = answers(pred)
        if variant == "stage1":
            b = p * user_prior / base
            preds["stage1_x_user_median"] = answers(readouts(b / b.sum(-1, keepdim=True), values)["median"])
    gold_values = [float(golds[i]) for i in ids]
    print(f"{len(ids)} queries, golds {dict(sorted(((x, gold_values.count(x)) for x in set(gold_values))))}")
    for k, pred in preds.items():
        m = metrics.rating_metrics(pm.task, golds, pred)
        print(f"{k:16s} MAE {m['mae']:.3f}  RMSE {m['rmse']:.3f}")
    for x, y in (("perfit_argmax", "most_frequent"), ("perfit_median", "most_frequent"), ("perfit_mean", "most_frequent"),
                 ("perfit_median", "perfit_argmax"), ("perfit_median", "stage1_median"), ("stage1_median", "stage1_argmax"),
                 ("stage1_x_user_median", "most_frequent")):
        d = metrics.paired_difference(pm.task, golds, preds[x], preds[y])
        print(f"{x} - {y}: {d['diff']:+.3f} ± {d['se']:.3f} (MAE, paired)")


if __name__ == "__main__":
    main()
