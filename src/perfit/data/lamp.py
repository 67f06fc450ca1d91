"""Convert the official LaMP layout (one user per question) to the per-user layout."""
from __future__ import annotations

import os

from ..tasks import get_task
from .schema import LABEL_FILE, OTHERS_FILE, TEST_FILE, DataError, load_golds, read_json, write_json_atomic


def _read_questions(path: str) -> list[dict]:
    qs = read_json(path)
    problems = []
    if not isinstance(qs, list):
        raise DataError([f"{path}: must be a list of questions"])
    for i, q in enumerate(qs):
        if not isinstance(q, dict):
            problems.append(f"{path}: question #{i}: must be an object")
            continue
        for key, typ in (("id", (str, int)), ("input", str), ("profile", list)):
            if not isinstance(q.get(key), typ):
                problems.append(f"{path}: question #{i} (id {q.get('id')!r}): field {key!r} missing or mistyped")
    if problems:
        raise DataError(problems)
    return qs


def _to_users(questions: list[dict], golds: dict[str, str], qpath: str, opath: str) -> list[dict]:
    missing = [str(q["id"]) for q in questions if str(q["id"]) not in golds]
    if missing:
        raise DataError([f"{opath}: no gold output for question ids {missing[:10]} of {qpath}"])
    users = []
    for q in questions:
        qid = str(q["id"])
        profile = [dict(p, id=str(p.get("id", f"{qid}-{k}"))) for k, p in enumerate(q["profile"])]
        users.append({"user_id": qid, "profile": profile, "query": [{"id": qid, "input": q["input"], "gold": golds[qid]}]})
    return users


def convert_lamp(task_name: str, questions: str, outputs: str, output_dir: str, num_test_users: int = 0,
                 others_questions: str = "", others_outputs: str = "") -> dict:
    """Each LaMP question is one user (its profile is that user's history). The `num_test_users` users with
    the longest histories become test users (user_top_100_history.json); the rest, or the questions of
    `others_questions`, become user_others.json for stage 1. Returns a summary."""
    task = get_task(task_name)
    qs = _read_questions(questions)
    _, golds = load_golds(outputs, task)
    users = _to_users(qs, golds, questions, outputs)
    if others_questions:
        if not others_outputs:
            raise DataError(["--others_questions needs --others_outputs (the gold outputs of those questions)"])
        others = _to_users(_read_questions(others_questions), load_golds(others_outputs, task)[1],
                           others_questions, others_outputs)
        test = users if num_test_users <= 0 else sorted(users, key=lambda u: -len(u["profile"]))[:num_test_users]
    else:
        n = num_test_users if num_test_users > 0 else max(1, len(users) // 2)
        ranked = sorted(users, key=lambda u: -len(u["profile"]))  # stable: ties keep file order
        test, others = ranked[:n], ranked[n:]
    # the label file carries the golds; the test file keeps them too, as the seed's data does
    labels = {"task": task.lamp_id, "golds": [{"id": u["query"][0]["id"], "output": u["query"][0]["gold"]} for u in test]}
    root = os.path.join(output_dir, task_name)
    write_json_atomic(os.path.join(root, OTHERS_FILE), others)
    write_json_atomic(os.path.join(root, TEST_FILE), test)
    write_json_atomic(os.path.join(root, LABEL_FILE), labels)
    return {"task": task_name, "output": root, "test_users": len(test), "other_users": len(others)}
