"""The per-user shift store: one SQLite file (standard library, WAL mode), each user a row holding its shift as a
safetensors blob, the blob's SHA-256, the shift's version and the user's record (what it was trained on, when, its
loss). The same file queues the personalization jobs a server accepted, so that nothing that got a 202 is lost.

- A write is a transaction: a group of users is either wholly stored or absent, and a user id is data (a primary
  key), never a path.
- Every write of a user's shift gets a new version id (its SHA-256 and a random suffix: never reused, even when the
  same history trains the same tensors again), which is what servers key their caches by. A replaced shift is kept
  under its version for RETIRED_KEEP_S, so a request admitted just before a retrain is answered with the shift it was
  admitted with; an erasure removes those too.
- Jobs: a user's accepted history waits in `jobs` (one row a user: a newer post replaces it) until its shift is
  stored, in the same transaction that removes the job; a job whose row was replaced or erased in the meantime is not
  stored. Failed jobs keep their error, not their items, and only the latest FAILED_JOBS_KEPT of them.
- Many readers and one writer at a time (WAL); a writer that finds the file busy waits (`busy_timeout`) instead of
  failing; every commit is synced (`synchronous=FULL`).
- 2 KiB pages: a shift of tens of KB spans overflow pages almost without slack (bytes on disk stay within ~3 % of the
  tensors' own bytes), and reads go through a memory map.
- Connections are per thread (a server's request threads read while its worker writes).

The interchange format of `export` / `import` is the earlier layout (a folder of `user-<hash>.safetensors` files and
an `index.json`), so runs made before the SQLite store convert with one command."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid

import torch
from safetensors.torch import load, save

from .data.schema import atomic_path
from .errors import RunStateError
from .faults import fault_point

BUSY_TIMEOUT_S = 60.0
MMAP_BYTES = 1 << 36
RETIRED_KEEP_S = 600.0  # how long a replaced shift stays loadable by its version (requests admitted before a retrain)
FAILED_JOBS_KEPT = 10_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    tensors BLOB NOT NULL,      -- the shift, as safetensors bytes
    sha256 TEXT NOT NULL,       -- of `tensors`
    info TEXT NOT NULL,         -- JSON: history_digest, items, examples, epoch_losses, final_loss, train_seconds, ...
    stored_at REAL NOT NULL,
    version TEXT NOT NULL       -- this write's version id (never reused)
);
CREATE TABLE IF NOT EXISTS retired (
    version TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    tensors BLOB NOT NULL,
    retired_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS retired_user ON retired (user_id);
CREATE TABLE IF NOT EXISTS jobs (
    user_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    items TEXT,                 -- JSON history items (NULL once failed)
    n_items INTEGER NOT NULL,
    state TEXT NOT NULL,        -- queued, training or failed
    accepted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT
);
"""


def history_digest(examples) -> str:
    """Identity of what a user's shift is trained on: its examples' prompts and targets, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.target]).encode("utf-8"))
    return h.hexdigest()[:24]


def save_safetensors_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path, ".safetensors") as tmp:
        with open(tmp, "wb") as f:
            f.write(_blob(tensors, metadata))


def _blob(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def remove_files(path: str) -> None:
    """Delete a store: its SQLite file and the write-ahead log and shared-memory files beside it."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)


class UserStore:
    """Per-user tensors in one SQLite file. `config` ({"key": ..., "settings": {...}}: what the stored shifts were
    trained with and on top of) is kept in the file, so the store loads without the command line; opening a store with
    another key is refused."""

    def __init__(self, path: str, config: dict | None = None):
        self.path = path
        self._local = threading.local()
        if not os.path.isfile(path):
            if config is None:
                raise RunStateError(f"{path}: not a user store")
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        stored = self._meta("config")
        if stored is None:  # a new file, or one whose creator was killed before its first commit
            if config is None:
                raise RunStateError(f"{path}: not a user store (no config)")
            with self._write() as c:
                c.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (json.dumps(config),))
            stored = config
        if config is not None and stored.get("key") != config.get("key"):
            raise RunStateError(f"{path}: the user store was made with other settings or data "
                                f"({_diff(stored.get('settings', stored), config.get('settings', config))}); "
                                f"use another run dir, or --overwrite 1 to retrain and replace it")
        self.config = stored

    # ---------------------------------------------------------------- connections and transactions

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if db.execute("PRAGMA page_count").fetchone()[0] == 0:
                db.execute("PRAGMA page_size = 2048")  # only before the first table exists
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")  # reads map the file instead of a system call a page
            db.executescript(_SCHEMA)
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")  # the write lock now: a second writer waits, never interleaves
            return self.db

        def __exit__(self, kind, value, tb):
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> "_Tx":
        return UserStore._Tx(self._db())

    def _meta(self, k: str):
        row = self._db().execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ---------------------------------------------------------------- reading

    def __contains__(self, user_id: str) -> bool:
        return self._db().execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is not None

    def __len__(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def users(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT user_id FROM users ORDER BY rowid")]

    def entry(self, user_id: str) -> dict:
        """What is stored about a user besides its tensors (trained at, items, digest, loss, seconds)."""
        row = self._db().execute("SELECT info, stored_at, length(tensors) FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            raise KeyError(f"user {user_id!r} is not in the store {self.path}")
        return json.loads(row[0]) | {"stored_at": row[1], "bytes": row[2]}

    def entries(self) -> dict[str, dict]:
        return {u: json.loads(i) | {"stored_at": t, "bytes": n}
                for u, i, t, n in self._db().execute("SELECT user_id, info, stored_at, length(tensors) FROM users ORDER BY rowid")}

    def get(self, user_id: str) -> dict[str, torch.Tensor]:
        row = self._db().execute("SELECT tensors FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            raise KeyError(f"user {user_id!r} is not in the store {self.path}")
        return load(row[0])

    def version(self, user_id: str) -> str | None:
        """The version id of the user's stored shift, None when it has none. It changes at every write of the shift
        and is never reused, so a cache keyed by it (a server's shifts, the vLLM plugin's device slots and prefix-cache
        keys) never serves a replaced or erased shift under a current key."""
        row = self._db().execute("SELECT version FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else row[0]

    def versions(self, user_ids) -> dict[str, str]:
        """{user: version} of those of `user_ids` that have a stored shift, read in one statement."""
        ids = list(dict.fromkeys(user_ids))
        out: dict[str, str] = {}
        for k in range(0, len(ids), 500):  # SQLite's bound on parameters
            part = ids[k: k + 500]
            out.update(self._db().execute(f"SELECT user_id, version FROM users WHERE user_id IN "
                                          f"({','.join('?' * len(part))})", part).fetchall())
        return out

    def get_versioned(self, user_id: str) -> tuple[dict[str, torch.Tensor], str] | None:
        """The user's tensors and their version read together (one row), None when the user has no shift."""
        row = self._db().execute("SELECT tensors, version FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else (load(row[0]), row[1])

    def get_version(self, user_id: str, version: str) -> dict[str, torch.Tensor] | None:
        """The user's shift of exactly this version: the stored one, or one replaced less than RETIRED_KEEP_S ago;
        None when that version is gone (the user was erased, or retrained longer ago)."""
        db = self._db()
        row = db.execute("SELECT tensors FROM users WHERE user_id = ? AND version = ?", (user_id, version)).fetchone() \
            or db.execute("SELECT tensors FROM retired WHERE user_id = ? AND version = ?", (user_id, version)).fetchone()
        return None if row is None else load(row[0])

    def bytes_per_user(self) -> float:
        """Mean size of the stored shifts (safetensors bytes)."""
        return self._db().execute("SELECT COALESCE(AVG(length(tensors)), 0) FROM users").fetchone()[0]

    # ---------------------------------------------------------------- writing

    def put_many(self, tensors_of: dict[str, dict[str, torch.Tensor]], info: dict[str, dict] | None = None,
                 jobs: dict[str, str] | None = None, keep_jobs: bool = False) -> list[str]:
        """Store {user_id: tensors} in one transaction: all of them, or (after a crash) none. A stored user is
        replaced by its new row in the same step (its previous shift is kept RETIRED_KEEP_S under its version).
        `jobs` ({user_id: job id}): users trained for a queued job are stored only if that job is still the user's
        (not replaced by a newer post, nor erased), and the job is removed with the same commit (`keep_jobs`: left
        queued, e.g. to refine an instant shift). Returns the users stored."""
        now = round(time.time(), 3)
        rows = []
        for uid, tensors in tensors_of.items():
            blob = _blob(tensors)  # the row holds the id; the blob only the tensors
            sha = hashlib.sha256(blob).hexdigest()
            rows.append((uid, blob, sha, json.dumps((info or {}).get(uid, {})), now, f"{sha[:32]}.{secrets.token_hex(6)}"))
        stored = []
        with self._write() as c:
            c.execute("DELETE FROM retired WHERE retired_at <= ?", (now - RETIRED_KEEP_S,))
            for k, row in enumerate(rows):
                uid = row[0]
                if jobs is not None and uid in jobs:
                    q, args = "jobs WHERE user_id = ? AND job_id = ? AND state != 'failed'", (uid, jobs[uid])
                    current = (c.execute(f"SELECT 1 FROM {q}", args).fetchone() is not None if keep_jobs
                               else c.execute(f"DELETE FROM {q}", args).rowcount > 0)
                    if not current:
                        continue  # replaced by a newer post, or erased, while it trained
                c.execute("INSERT OR REPLACE INTO retired SELECT version, user_id, tensors, ? FROM users "
                          "WHERE user_id = ?", (now, uid))
                c.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, ?)", row)
                stored.append(uid)
                if k == 0:
                    fault_point("store.mid_write")
        return stored

    def delete(self, user_id: str) -> bool:
        """Everything stored about the user, in one transaction: its shift, its replaced shifts and its queued or
        failed job. Returns whether there was anything."""
        with self._write() as c:
            n = c.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount
            c.execute("DELETE FROM retired WHERE user_id = ?", (user_id,))
            n += c.execute("DELETE FROM jobs WHERE user_id = ? AND state != 'failed'", (user_id,)).rowcount
            c.execute("DELETE FROM jobs WHERE user_id = ?", (user_id,))
            return n > 0

    # ---------------------------------------------------------------- the jobs a server accepted

    def enqueue(self, user_id: str, items: list[dict]) -> str:
        """Queue a personalization of the user on these history items (replacing a job of the user still waiting),
        committed before this returns. Returns the job's id."""
        job = uuid.uuid4().hex
        with self._write() as c:
            c.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, 'queued', ?, NULL, NULL, NULL)",
                      (user_id, job, json.dumps(items), len(items), round(time.time(), 3)))
        return job

    def pending_jobs(self) -> list[tuple[str, str]]:
        """(user, job id) of every job queued or interrupted in training, oldest first."""
        return self._db().execute("SELECT user_id, job_id FROM jobs WHERE state != 'failed' "
                                  "ORDER BY accepted_at, rowid").fetchall()

    def take_jobs(self, jobs: dict[str, str]) -> dict[str, list[dict]]:
        """The history items of those of `jobs` ({user: job id}) that are still current, marked as training."""
        out = {}
        with self._write() as c:
            for uid, job in jobs.items():
                row = c.execute("SELECT items FROM jobs WHERE user_id = ? AND job_id = ? AND state != 'failed'",
                                (uid, job)).fetchone()
                if row is not None:
                    c.execute("UPDATE jobs SET state = 'training', started_at = ? WHERE user_id = ?", (time.time(), uid))
                    out[uid] = json.loads(row[0])
        return out

    def fail_jobs(self, jobs: dict[str, str], error: str) -> None:
        """Mark these jobs failed with `error` (their items are dropped); only the latest FAILED_JOBS_KEPT are kept."""
        with self._write() as c:
            for uid, job in jobs.items():
                c.execute("UPDATE jobs SET state = 'failed', items = NULL, error = ?, finished_at = ? "
                          "WHERE user_id = ? AND job_id = ?", (error[:2000], time.time(), uid, job))
            c.execute("DELETE FROM jobs WHERE state = 'failed' AND rowid NOT IN (SELECT rowid FROM jobs WHERE "
                      "state = 'failed' ORDER BY finished_at DESC LIMIT ?)", (FAILED_JOBS_KEPT,))

    def job_items(self, user_id: str) -> list[dict] | None:
        """The history items of the user's queued or training job, if any."""
        row = self._db().execute("SELECT items FROM jobs WHERE user_id = ? AND state != 'failed'", (user_id,)).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

    def job(self, user_id: str) -> dict | None:
        """The user's job, if any: state (queued, training, failed), items, accepted_at, started_at, error."""
        row = self._db().execute("SELECT job_id, state, n_items, accepted_at, started_at, finished_at, error FROM jobs "
                                 "WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            return None
        keys = ("job_id", "status", "items", "queued_at", "started_at", "failed_at", "error")
        return {k: v for k, v in zip(keys, row) if v is not None}

    # ---------------------------------------------------------------- operators

    def verify(self) -> list[str]:
        """Every problem found: SQLite's own integrity check, then each row's checksum and tensors."""
        db = self._db()
        problems = [f"{self.path}: sqlite integrity: {r[0]}" for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        names = None
        for uid, blob, sha, info in db.execute("SELECT user_id, tensors, sha256, info FROM users ORDER BY rowid"):
            where = f"{self.path}: user {uid!r}"
            if hashlib.sha256(blob).hexdigest() != sha:
                problems.append(f"{where}: checksum mismatch (the shift's bytes changed after they were stored)")
                continue
            try:
                t = load(blob)
                json.loads(info)
            except Exception as e:  # noqa: BLE001 - a corrupt row is a finding, not a crash
                problems.append(f"{where}: unreadable ({type(e).__name__}: {e})")
                continue
            if names is None:
                names = sorted(t)
            if sorted(t) != names:
                problems.append(f"{where}: tensors {sorted(t)[:4]}... differ from the other users' {names[:4]}...")
            if any(not torch.isfinite(v).all() for v in t.values()):
                problems.append(f"{where}: non-finite values")
        return problems

    def export(self, folder: str) -> int:
        """Every user's shift and record in one `users.safetensors` (perfit.method.io's format; the store's config in
        its metadata), written atomically. Returns the users exported."""
        from .method.io import save_users

        tensors, info = {}, {}
        for uid, blob, rec, t in self._db().execute("SELECT user_id, tensors, info, stored_at FROM users ORDER BY rowid"):
            tensors[uid], info[uid] = load(blob), {"stored_at": t, **json.loads(rec)}
        save_users(folder, None, tensors, info, {"store_config": json.dumps(self.config)})
        return len(tensors)

    @classmethod
    def import_folder(cls, folder: str, path: str) -> "UserStore":
        """A store made from a folder with `users.safetensors` (what `export` or `PerFitModel.save_pretrained` writes):
        built in a temporary file renamed into place once every user is in, so a failed import leaves no store."""
        from safetensors import SafetensorError

        from .method.io import load_users

        try:
            tensors, info, meta = load_users(folder)
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise RunStateError(f"{folder}: not a folder of users' shifts ({e})") from None
        config = json.loads(meta["store_config"]) if "store_config" in meta else {"key": "imported", "settings": {}}
        tmp = f"{path}.importing-{os.getpid()}"
        try:
            store = cls(tmp, config)
            store.put_many(tensors, {u: {k: v for k, v in e.items() if k != "stored_at"} for u, e in info.items()})
            store.disk_bytes()  # folds the write-ahead log into the file before it moves
            store.close()
            os.replace(tmp, path)
        finally:
            remove_files(tmp)
        return cls(path)

    def disk_bytes(self) -> int:
        """The file's size once the write-ahead log is folded into it."""
        self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return os.path.getsize(self.path)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:5]) or "same settings, other data"
