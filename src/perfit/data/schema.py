"""Typed loading and validation of the per-user layout.

Every problem names the file, the user, the item index and the field; all problems of a file are gathered
and raised together as one `DataError`, before anything is trained or written.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import PerFitError
from ..tasks import LAMP_IDS, Task, get_task

OTHERS_FILE = "user_others.json"
TEST_FILE = "user_top_100_history.json"
LABEL_FILE = "user_top_100_history_label.json"
MAX_REPORTED = 30


class DataError(PerFitError, ValueError):
    """Bad input data. `problems` lists every problem found, each naming file, user, item and field."""

    heading = "invalid data:\n"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED]
        more = len(self.problems) - len(shown)
        msg = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(msg)


@dataclass
class Query:
    id: str
    input: str
    gold: str = ""


@dataclass
class User:
    user_id: str
    profile: list[dict]
    query: list[Query] = field(default_factory=list)


@dataclass
class TaskData:
    task: Task
    data_dir: str
    test_users: list[User]
    golds: dict[str, str]  # query id -> gold output of the test users
    others_path: str

    def iter_others(self) -> Iterator[User]:
        """Stream and validate user_others.json (it can be gigabytes)."""
        return load_users(self.others_path, self.task, role="others")


def umask_mode(path: str) -> None:
    """Give a temporary file (mkstemp makes it 0600) the mode a plain open() would have, before it is renamed."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path beside `path`; on success it gets the usual file mode, is synced and renamed onto
    `path` in one step, on failure it is removed: a crash never leaves a half-written file under `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def latest(items: list, max_history: int) -> list:
    """A user's latest `max_history` history items (0: all): what its personal stage and every per-user baseline see."""
    return items[-max_history:] if max_history > 0 else items


def write_json_atomic(path: str, obj: Any, indent: int | None = 1) -> None:
    with atomic_path(path, ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)


def iter_json_array(path: str) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one at a time (ijson's C parser: memory stays bounded by the
    largest element, whatever the file's size)."""
    import ijson

    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head.startswith(b"["):
            raise DataError([f"{path}: malformed JSON: expected a list ('[') at the start"])
        f.seek(0)
        try:
            yield from ijson.items(f, "item", use_float=True)
        except ijson.JSONError as e:
            detail = str(e).strip().splitlines()[0]
            raise DataError([f"{path}: malformed JSON near byte {f.tell()}: {detail}"]) from None


def read_json(path: str, what: str = "") -> Any:
    """A whole (small) JSON file; a missing or malformed one is a DataError naming it (`what`: e.g. the flag)."""
    name = f"{what} {path}" if what else path
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError([f"{name}: file not found"]) from None
    except json.JSONDecodeError as e:
        raise DataError([f"{name}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"]) from None


def _as_id(value: Any) -> str | None:
    """Ids may be strings or integers (official LaMP files use both); anything else, or empty, is invalid."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value else None


def _check_str(problems: list[str], where: str, obj: dict, key: str, allow_empty: bool = False) -> str | None:
    if key not in obj:
        problems.append(f"{where}: missing field {key!r}")
        return None
    v = obj[key]
    if not isinstance(v, str):
        problems.append(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
        return None
    if not allow_empty and not v.strip():
        problems.append(f"{where}: field {key!r} is empty")
        return None
    return v


def validate_items(items: list, where: str, task: Task) -> list[str]:
    """Problems of a list of history items (each an object with a unique id and the task's fields, a
    classification target from the label set). Integer ids become strings in place."""
    problems: list[str] = []
    item_ids: set[str] = set()
    for i, item in enumerate(items):
        w = f"{where} profile item {i}"
        if not isinstance(item, dict):
            problems.append(f"{w}: must be an object, got {type(item).__name__}")
            continue
        iid = _as_id(item.get("id"))
        if iid is None:
            problems.append(f"{w}: field 'id' missing or not a string")
        elif iid in item_ids:
            problems.append(f"{w}: duplicate item id {iid!r}")
        else:
            item["id"] = iid
            item_ids.add(iid)
        for key in task.item_fields:
            v = _check_str(problems, w, item, key, allow_empty=(key != task.target_field))
            if v is not None and task.labelled_items and task.has_labels and key == task.target_field and v not in task.labels:
                problems.append(f"{w}: field {key!r} value {v!r} is not one of the task's {len(task.labels)} labels")
    return problems


def _list_field(raw: dict, key: str, here: str, role: str, why: str, problems: list[str]) -> list:
    v = raw.get(key)
    if not isinstance(v, list):
        problems.append(f"{here}: field {key!r} missing or not a list")
        return []
    if not v and role == "test":
        problems.append(f"{here}: field {key!r} is empty ({why})")
    return v


def _validate_user(raw: Any, idx: int, path: str, task: Task, role: str, problems: list[str]) -> User | None:
    if not isinstance(raw, dict):
        problems.append(f"{path}: user #{idx}: must be an object, got {type(raw).__name__}")
        return None
    uid = _as_id(raw.get("user_id"))
    if uid is None:
        problems.append(f"{path}: user #{idx}: field 'user_id' missing or not a string")
        return None
    here = f"{path}: user {uid!r}"
    n0 = len(problems)
    profile = _list_field(raw, "profile", here, role, "a test user needs history to personalize on", problems)
    problems += validate_items(profile, here, task)
    queries: list[Query] = []
    rawq = _list_field(raw, "query", here, role, "nothing to predict", problems)
    for j, q in enumerate(rawq):
        w = f"{here} query {j}"
        if not isinstance(q, dict):
            problems.append(f"{w}: must be an object, got {type(q).__name__}")
            continue
        qid = _as_id(q.get("id"))
        if qid is None:
            problems.append(f"{w}: field 'id' missing or not a string")
            continue
        inp = _check_str(problems, f"{w} (id {qid!r})", q, "input")
        gold = q.get("gold", "")
        if gold is None:
            gold = ""
        if not isinstance(gold, str):
            problems.append(f"{w} (id {qid!r}): field 'gold' must be a string, got {type(gold).__name__}")
            gold = ""
        elif gold and task.has_labels and gold not in task.labels:
            problems.append(f"{w} (id {qid!r}): field 'gold' value {gold!r} is not one of the task's labels")
        if inp is not None:
            queries.append(Query(qid, inp, gold))
    if len(problems) > n0:
        return None
    return User(uid, profile, queries)


def load_users(path: str, task: Task, role: str = "test") -> Iterator[User]:
    """Stream the users of a per-user file, validating each, in one pass with bounded memory. Users are yielded
    while the file is valid so far; every problem is gathered and raised as one DataError at the end, so a consumer
    that acts only once the iteration is done never acts on a partly valid file."""
    if not os.path.isfile(path):
        raise DataError([f"{path}: file not found"])
    problems: list[str] = []
    seen_users: set[str] = set()
    seen_queries: dict[str, str] = {}
    for idx, raw in enumerate(iter_json_array(path)):
        u = _validate_user(raw, idx, path, task, role, problems)
        if u is None:
            continue
        if u.user_id in seen_users:
            problems.append(f"{path}: user {u.user_id!r}: duplicate user_id (user #{idx})")
            continue
        seen_users.add(u.user_id)
        for q in u.query:
            if q.id in seen_queries:
                problems.append(f"{path}: user {u.user_id!r}: query id {q.id!r} also used by user {seen_queries[q.id]!r}")
            seen_queries[q.id] = u.user_id
        if not problems:
            yield u
    if problems:
        raise DataError(problems)


def load_golds(path: str, task: Task | None = None) -> tuple[str, dict[str, str]]:
    """Read a LaMP label file {task, golds: [{id, output}]}; returns (task name, {id: output})."""
    data = read_json(path)
    problems: list[str] = []
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise DataError([f"{path}: must be an object with a list field 'golds'"])
    lamp = data.get("task", "")
    name = LAMP_IDS.get(lamp, "")
    if task is not None and lamp and name != task.name:
        problems.append(f"{path}: field 'task' is {lamp!r} but task_name is {task.name!r} ({task.lamp_id})")
    golds: dict[str, str] = {}
    for i, g in enumerate(data["golds"]):
        w = f"{path}: golds[{i}]"
        if not isinstance(g, dict):
            problems.append(f"{w}: must be an object")
            continue
        gid = _as_id(g.get("id"))
        if gid is None:
            problems.append(f"{w}: field 'id' missing or not a string")
            continue
        out = g.get("output")
        if not isinstance(out, str):
            problems.append(f"{w} (id {gid!r}): field 'output' missing or not a string")
            continue
        if gid in golds:
            problems.append(f"{w}: duplicate id {gid!r}")
        if task is not None and task.has_labels and out not in task.labels:
            problems.append(f"{w} (id {gid!r}): field 'output' value {out!r} is not one of the task's labels")
        golds[gid] = out
    if problems:
        raise DataError(problems)
    return name, golds


def load_task_data(data_dir: str, task_name: str) -> TaskData:
    """Load and validate <data_dir>/<task_name>/. Test users are loaded; user_others.json is streamed
    once here to validate it (and again by stage 1 only when no reusable checkpoint exists)."""
    task = get_task(task_name)
    root = os.path.join(data_dir, task_name)
    if not os.path.isdir(root):
        raise DataError([f"{root}: data folder not found (expected {OTHERS_FILE}, {TEST_FILE}, {LABEL_FILE})"])
    problems: list[str] = []
    test_path, label_path, others_path = (os.path.join(root, n) for n in (TEST_FILE, LABEL_FILE, OTHERS_FILE))
    users: list[User] = []
    golds: dict[str, str] = {}
    for fn in (lambda: users.extend(load_users(test_path, task, "test")),
               lambda: golds.update(load_golds(label_path, task)[1])):
        try:
            fn()
        except DataError as e:
            problems += e.problems
    if not os.path.isfile(others_path):
        problems.append(f"{others_path}: file not found")
    if not problems:
        for u in users:
            missing = [q.id for q in u.query if q.id not in golds]
            if missing:
                problems.append(f"{label_path}: no gold label for query ids {missing[:10]} of user {u.user_id!r} "
                                f"(from {test_path})")
    if problems:
        raise DataError(problems)
    return TaskData(task, data_dir, users, golds, others_path)


def data_fingerprint(paths: list[str]) -> str:
    """Identity of input files by content, for stage-1 reuse decisions: a copy, a move or a fresh download of the
    same data keeps its stage-1 checkpoint, any edit does not. Hashing reads each file once per process (about
    1 GB/s); the result is remembered while the file's size and mtime stay the same."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(_content_digest(os.path.abspath(p), st.st_size, st.st_mtime_ns, st.st_ino).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime_ns: int, ino: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def summarize(td: TaskData, others: Iterator[User] | None = None) -> dict:
    """Counts of the test users and, streamed, of the other users."""
    items = [len(u.profile) for u in td.test_users]
    summary: dict[str, Any] = {
        "task": td.task.name,
        "test_users": len(td.test_users),
        "queries": sum(len(u.query) for u in td.test_users),
        "history_items": sum(items),
        "history_per_user_min_median_max": [min(items), sorted(items)[len(items) // 2], max(items)] if items else [],
    }
    if td.task.has_labels:
        summary["gold_labels"] = dict(Counter(td.golds[q.id] for u in td.test_users for q in u.query).most_common())
    if others is not None:
        n_users = n_examples = 0
        for u in others:
            n_users += 1
            n_examples += len(u.profile) + sum(1 for q in u.query if q.gold)
        summary["other_users"] = n_users
        summary["other_examples"] = n_examples
    return summary
