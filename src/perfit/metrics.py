"""LaMP metrics. Predictions and golds share the label-file layout {task, golds: [{id, output}]}."""
from __future__ import annotations

import math

from .data.schema import DataError, load_golds
from .tasks import Task, get_task


def _aligned(golds: dict[str, str], preds: dict[str, str]) -> list[str]:
    missing = sorted(set(golds) - set(preds))
    extra = sorted(set(preds) - set(golds))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} gold ids have no prediction: {missing[:10]}")
        if extra:
            parts.append(f"{len(extra)} predicted ids have no gold: {extra[:10]}")
        raise DataError(["predictions and golds do not match one to one: " + "; ".join(parts)])
    return sorted(golds)


def standard_error(xs: list[float]) -> float:
    """Standard error of the mean of per-query scores (sample standard deviation / sqrt(n)); 0 below 2 queries."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _labels(task: Task, golds: dict[str, str], preds: dict[str, str], ids: list[str]) -> tuple[list[int], list[int]]:
    """Gold and predicted label indices (-1: not one of the task's labels; a prediction is stripped, case kept)."""
    index = {label: i for i, label in enumerate(task.labels)}
    return [index.get(golds[i], -1) for i in ids], [index.get(preds[i].strip(), -1) for i in ids]


def classification_metrics(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    ids = _aligned(golds, preds)
    y, p = _labels(task, golds, preds, ids)
    return {
        "accuracy": float(accuracy_score(y, p)),
        "accuracy_se": standard_error([float(a == b) for a, b in zip(y, p)]),
        "f1": float(f1_score(y, p, labels=list(range(len(task.labels))), average="macro", zero_division=0)),
        "n": len(ids),
    }


def rating_value(pred: str, gold: str) -> float:
    """A predicted score as LaMP's LaMP-3 evaluation reads it (LaMP/metrics/classification_metrics.py,
    create_metric_mae_rmse): the stripped text as a number if it is one, else the end of the 1-5 scale farthest from
    the gold (1 when |1 - gold| > |5 - gold|, else 5). A number outside 1-5 counts as it is, as there. Ours: "nan"
    and "inf", which Python's float() also reads, count as not a number."""
    g = float(gold)
    try:
        v = float(pred.strip())
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        return 1.0 if abs(1 - g) > abs(5 - g) else 5.0
    return v


def _abs_errors(golds: dict[str, str], preds: dict[str, str], ids: list[str]) -> list[float]:
    return [abs(rating_value(preds[i], golds[i]) - float(golds[i])) for i in ids]


def rating_metrics(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict:
    """MAE and RMSE over queries with LaMP's reading of answers (`rating_value`); `invalid`: answers that were not a
    number. Lower is better."""
    ids = _aligned(golds, preds)
    err = _abs_errors(golds, preds, ids)
    n = max(len(ids), 1)
    invalid = sum(1 for i in ids if not _is_number(preds[i]))
    return {"mae": sum(err) / n, "mae_se": standard_error(err), "rmse": math.sqrt(sum(e * e for e in err) / n),
            "invalid": invalid, "n": len(ids)}


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text.strip()))
    except ValueError:
        return False


def _rouge(golds: dict[str, str], preds: dict[str, str], ids: list[str]) -> tuple[list[float], list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(golds[i], preds[i]) for i in ids]
    return [s["rouge1"].fmeasure for s in scores], [s["rougeL"].fmeasure for s in scores]


def generation_metrics(golds: dict[str, str], preds: dict[str, str]) -> dict:
    ids = _aligned(golds, preds)
    r1, rl = _rouge(golds, preds, ids)
    n = max(len(ids), 1)
    return {"rouge-1": sum(r1) / n, "rouge-1_se": standard_error(r1), "rouge-L": sum(rl) / n, "n": len(ids)}


def evaluate(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict:
    if task.metric_kind == "classification":
        return classification_metrics(task, golds, preds)
    if task.metric_kind == "rating":
        return rating_metrics(task, golds, preds)
    return generation_metrics(golds, preds)


PRIMARY = {"classification": "accuracy", "rating": "mae", "generation": "rouge-1"}
REPORTED = {"classification": ("accuracy", "f1"), "rating": ("mae", "rmse"), "generation": ("rouge-1", "rouge-L")}


def report_keys(task: Task) -> list[str]:
    """The metrics tables show for a task, the primary one first."""
    return list(REPORTED[task.metric_kind])


def primary_metric(task: Task) -> str:
    """The metric a task is judged by (LaMP's first column): accuracy, MAE (lower is better) or ROUGE-1."""
    return PRIMARY[task.metric_kind]


def per_query_scores(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict[str, float]:
    """Each query's contribution to the primary metric (exact label match, absolute error, or ROUGE-1 F-measure):
    their mean is the metric."""
    ids = _aligned(golds, preds)
    if task.metric_kind == "classification":
        return {i: float(a == b) for i, a, b in zip(ids, *_labels(task, golds, preds, ids))}
    if task.metric_kind == "rating":
        return dict(zip(ids, _abs_errors(golds, preds, ids)))
    return dict(zip(ids, _rouge(golds, preds, ids)[0]))


def paired_difference(task: Task, golds: dict[str, str], preds: dict[str, str], reference: dict[str, str]) -> dict:
    """The primary metric of `preds` minus that of `reference`, query by query on the same queries: the mean
    difference and its standard error (paired, so what both get right or wrong alike cancels). For ratings (MAE) a
    negative difference is the better one."""
    a = per_query_scores(task, golds, preds)
    b = per_query_scores(task, golds, reference)
    d = [a[i] - b[i] for i in sorted(a)]
    return {"diff": sum(d) / max(len(d), 1), "se": standard_error(d), "n": len(d)}


def evaluate_files(task_name: str, golds_json: str, preds_json: str) -> dict:
    task = get_task(task_name)
    _, golds = load_golds(golds_json, task)
    _, preds = load_golds(preds_json, None)  # predictions may hold labels outside the set
    return evaluate(task, golds, preds)


def preds_document(task: Task, preds: dict[str, str]) -> dict:
    return {"task": task.lamp_id, "golds": [{"id": k, "output": v} for k, v in preds.items()]}
