"""The per-user shift store: one safetensors file per user, an index, atomic writes.

A user id is data, never a path: files are named by a hash of the id. Every entry is written to a temporary file
and renamed into place, and the index is rewritten atomically after it, so a crash never loses a user that was
already stored nor leaves a half-written one that loads; a retrained user's new file replaces the old one in one
rename. Each entry records what the user was trained on (`history_digest`), so a user whose history changed is
never served a stale shift by a batch run."""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

from .data.schema import atomic_path, write_json_atomic
from .errors import RunStateError

INDEX = "index.json"
CONFIG = "store_config.json"


def user_file(user_id: str) -> str:
    return "user-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:24] + ".safetensors"


def history_digest(examples) -> str:
    """Identity of what a user's shift is trained on: its examples' prompts and targets, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.target]).encode("utf-8"))
    return h.hexdigest()[:24]


def save_safetensors_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path, ".safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


class UserStore:
    """Folder of per-user tensors. `config` ({"key": ..., "settings": {...}}: what the stored shifts were trained
    with and on top of) is stored beside them so the store loads without the command line; opening a store with
    another key is refused."""

    def __init__(self, root: str, config: dict | None = None):
        self.root = root
        cfg_path = os.path.join(root, CONFIG)
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                stored = json.load(f)
            if config is not None and stored.get("key") != config.get("key"):
                raise RunStateError(f"{cfg_path}: the user store was made with other settings or data "
                                    f"({_diff(stored.get('settings', stored), config.get('settings', config))}); "
                                    f"use another run dir, or --overwrite 1 to retrain and replace it")
            self.config = stored
        elif config is None:
            raise RunStateError(f"{cfg_path}: not a user store")
        else:
            os.makedirs(root, exist_ok=True)
            write_json_atomic(cfg_path, config)
            self.config = config
        ip = os.path.join(root, INDEX)
        self.index: dict[str, dict] = {}
        if os.path.isfile(ip):
            with open(ip, encoding="utf-8") as f:
                self.index = json.load(f)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self.index and os.path.isfile(os.path.join(self.root, self.index[user_id]["file"]))

    def __len__(self) -> int:
        return len(self.index)

    def users(self) -> list[str]:
        return list(self.index)

    def entry(self, user_id: str) -> dict:
        """What is stored about a user besides its tensors (trained at, items, digest, loss, seconds)."""
        if user_id not in self:
            raise KeyError(f"user {user_id!r} is not in the store {self.root}")
        return {k: v for k, v in self.index[user_id].items() if k != "file"}

    def put_many(self, tensors_of: dict[str, dict[str, torch.Tensor]], info: dict[str, dict] | None = None) -> None:
        """Store {user_id: tensors}; each user's file is replaced in one rename, then the index is rewritten."""
        for uid, tensors in tensors_of.items():
            fn = user_file(uid)
            save_safetensors_atomic(os.path.join(self.root, fn), tensors, {"user_id": uid})
            self.index[uid] = {"file": fn, "stored_at": round(time.time(), 3), **(info or {}).get(uid, {})}
        write_json_atomic(os.path.join(self.root, INDEX), self.index)

    def get(self, user_id: str) -> dict[str, torch.Tensor]:
        if user_id not in self:
            raise KeyError(f"user {user_id!r} is not in the store {self.root}")
        return load_file(os.path.join(self.root, self.index[user_id]["file"]))

    def delete(self, user_id: str) -> bool:
        """Remove a user's tensors and record. The index goes first: a crash in between leaves an orphan file
        that nothing reads, never an entry without its file."""
        entry = self.index.pop(user_id, None)
        if entry is None:
            return False
        write_json_atomic(os.path.join(self.root, INDEX), self.index)
        try:
            os.unlink(os.path.join(self.root, entry["file"]))
        except FileNotFoundError:
            pass
        return True

    def bytes_per_user(self) -> float:
        sizes = [os.path.getsize(os.path.join(self.root, e["file"])) for e in self.index.values()]
        return sum(sizes) / max(len(sizes), 1)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:5]) or "same settings, other data"
