"""LaMP metrics. Predictions and golds share the label-file layout {task, golds: [{id, output}]}."""
from __future__ import annotations

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


def classification_metrics(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    ids = _aligned(golds, preds)
    index = {label: i for i, label in enumerate(task.labels)}
    y = [index.get(golds[i], -1) for i in ids]
    p = [index.get(preds[i].strip(), -1) for i in ids]
    return {
        "accuracy": float(accuracy_score(y, p)),
        "f1": float(f1_score(y, p, labels=list(range(len(task.labels))), average="macro", zero_division=0)),
        "n": len(ids),
    }


def generation_metrics(golds: dict[str, str], preds: dict[str, str]) -> dict:
    from rouge_score import rouge_scorer

    ids = _aligned(golds, preds)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1 = rl = 0.0
    for i in ids:
        s = scorer.score(golds[i], preds[i])
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    n = max(len(ids), 1)
    return {"rouge-1": r1 / n, "rouge-L": rl / n, "n": len(ids)}


def evaluate(task: Task, golds: dict[str, str], preds: dict[str, str]) -> dict:
    if task.is_classification:
        return classification_metrics(task, golds, preds)
    return generation_metrics(golds, preds)


def evaluate_files(task_name: str, golds_json: str, preds_json: str) -> dict:
    task = get_task(task_name)
    _, golds = load_golds(golds_json, task)
    _, preds = load_golds(preds_json, None)  # predictions may hold labels outside the set
    return evaluate(task, golds, preds)


def preds_document(task: Task, preds: dict[str, str]) -> dict:
    return {"task": task.lamp_id, "golds": [{"id": k, "output": v} for k, v in preds.items()]}
