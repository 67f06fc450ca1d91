"""The per-user shift store: one safetensors file per user, an index, atomic writes.

A user id is data, never a path: files are named by a hash of the id. Every entry is written to a
temporary file and renamed into place, and the index is rewritten atomically after it, so a crash never
loses a user that was already stored nor leaves a half-written one that loads."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .data.schema import umask_mode, write_json_atomic
from .shifts import Shifter

INDEX = "index.json"
CONFIG = "store_config.json"


def user_file(user_id: str) -> str:
    return "user-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:24] + ".safetensors"


def save_safetensors_atomic(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class UserStore:
    """Folder of personal shifts. `config` (a JSON-able dict: hidden size, layers, ranks, positions and the
    stage-1 checkpoint it builds on) is stored beside them so the store loads without the command line."""

    def __init__(self, root: str, config: dict | None = None):
        self.root = root
        cfg_path = os.path.join(root, CONFIG)
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                stored = json.load(f)
            if config is not None and stored != config:
                raise ValueError(f"{cfg_path}: the user store was made with other settings "
                                 f"({_diff(stored, config)}); use another run dir or delete the store")
            self.config = stored
        elif config is None:
            raise FileNotFoundError(f"{cfg_path}: not a user store")
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

    def put_many(self, shifter: Shifter, users: dict[str, int], info: dict[str, dict] | None = None) -> None:
        """Store the personal modules `users` = {user_id: module index of `shifter`}."""
        for uid, k in users.items():
            tensors = {f"layer.{l}.{name}": t for l in shifter.layers for name, t in shifter.personal[str(l)].slice_state(k).items()}
            self._write(uid, tensors, (info or {}).get(uid, {}))
        write_json_atomic(os.path.join(self.root, INDEX), self.index)

    def put_tensors(self, user_id: str, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
        """Store any per-user tensors (e.g. one LoRA adapter per user)."""
        self._write(user_id, tensors, info or {})
        write_json_atomic(os.path.join(self.root, INDEX), self.index)

    def _write(self, uid: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
        fn = user_file(uid)
        save_safetensors_atomic(os.path.join(self.root, fn), tensors, {"user_id": uid})
        self.index[uid] = {"file": fn, **info}

    def get(self, user_id: str) -> dict[str, torch.Tensor]:
        if user_id not in self:
            raise KeyError(f"user {user_id!r} is not in the store {self.root}")
        return load_file(os.path.join(self.root, self.index[user_id]["file"]))

    def load_into(self, shifter: Shifter, users: dict[str, int]) -> None:
        for uid, k in users.items():
            t = self.get(uid)
            for l in shifter.layers:
                shifter.personal[str(l)].load_slice(k, {n: t[f"layer.{l}.{n}"] for n in ("rotate_raw", "weight", "bias")})

    def bytes_per_user(self) -> float:
        sizes = [os.path.getsize(os.path.join(self.root, e["file"])) for e in self.index.values()]
        return sum(sizes) / max(len(sizes), 1)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:5])
