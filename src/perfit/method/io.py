"""Saving and loading shifts in a folder of their own, independent of a run dir (peft's `save_pretrained` /
`from_pretrained`):

    <folder>/perfit_config.json        PerFitConfig (readable; the same JSON is in each tensors file's metadata)
    <folder>/collective.safetensors    the collective shift and P0 (`Shifter.state_dict()`, one personal module)
    <folder>/users.safetensors         users' personal shifts: tensor `<i>.<key>` is user i's `<key>`
                                       (`shifts.user_tensor_names`); the metadata's "users" lists the ids in order
    <folder>/generator.safetensors     the shift generator, if any (its spec and what made it in the metadata)

User ids are data (in the metadata), never file names. Each tensors file is written to a temporary name and renamed,
so a reader sees the old file or the new one. A stage-1 checkpoint in a run dir, `perfit store export` and `perfit
store import` use this format.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .shifts import Shifter, ShiftState, position_index
from ..data import write_json_atomic
from ..store import save_safetensors_atomic
from .bank import ShiftBank
from .config import PerFitConfig

if TYPE_CHECKING:
    from .generator import ShiftGenerator

CONFIG_NAME = "perfit_config.json"
COLLECTIVE_NAME = "collective.safetensors"
USERS_NAME = "users.safetensors"
GENERATOR_NAME = "generator.safetensors"


def _write_config(folder: str, config: PerFitConfig) -> None:
    write_json_atomic(os.path.join(folder, CONFIG_NAME), config.to_dict())


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _config_of(meta: dict[str, str], path: str) -> PerFitConfig:
    if "perfit_config" not in meta:
        raise ValueError(f"{path}: no perfit_config in its metadata (not saved by PerFit's save_pretrained)")
    return PerFitConfig.from_dict(json.loads(meta["perfit_config"]), where=path)


def save_collective(folder: str, config: PerFitConfig, collective: Shifter, extra: dict[str, str] | None = None) -> None:
    """The collective shift and P0 (`extra`: more metadata strings, e.g. the key of the run that made them)."""
    os.makedirs(folder, exist_ok=True)
    save_safetensors_atomic(os.path.join(folder, COLLECTIVE_NAME), collective.state_dict(),
                 {"perfit_config": config.to_json(), **(extra or {})})
    _write_config(folder, config)


def load_collective(folder: str) -> tuple[Shifter, PerFitConfig, dict[str, str]]:
    """(the collective shift and P0 as a one-user Shifter, its config, the file's other metadata)."""
    path = os.path.join(folder, COLLECTIVE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {COLLECTIVE_NAME} (save one with save_pretrained)")
    tensors, meta = _read(path)
    cfg = _config_of(meta, path)
    return shifter_from(cfg, tensors, path), cfg, {k: v for k, v in meta.items() if k != "perfit_config"}


def shifter_from(cfg: PerFitConfig, tensors: dict[str, torch.Tensor], where: str) -> Shifter:
    """The one-user Shifter (collective shift and P0) that `cfg` describes, holding `tensors` in their own dtype
    (float64 shifts stay float64)."""
    sh = Shifter(cfg.hidden_size, cfg.layers, cfg.rank, cfg.user_rank, 1, init=None)
    sh = sh.to(next(iter(tensors.values())).dtype)
    try:
        sh.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{where}: its tensors do not match its perfit_config ({e})") from None
    return sh


def save_users(folder: str, config: PerFitConfig | None, users: dict[str, dict[str, torch.Tensor]],
               info: dict[str, dict] | None = None, extra: dict[str, str] | None = None) -> None:
    """Users' personal shifts in one file (`info`: a JSON record per user kept beside them)."""
    os.makedirs(folder, exist_ok=True)
    ids = list(users)
    tensors = {f"{i}.{k}": t for i, u in enumerate(ids) for k, t in users[u].items()}
    meta = {"users": json.dumps(ids), "info": json.dumps({u: (info or {}).get(u, {}) for u in ids}), **(extra or {})}
    if config is not None:
        meta["perfit_config"] = config.to_json()
    save_safetensors_atomic(os.path.join(folder, USERS_NAME), tensors, meta)
    if config is not None:
        _write_config(folder, config)


def load_users(folder: str, only: list[str] | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict], dict[str, str]]:
    """({user: its tensors}, {user: its record}, the file's other metadata); `only`: just these users."""
    path = os.path.join(folder, USERS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {USERS_NAME}")
    tensors, meta = _read(path)
    try:
        ids, info = json.loads(meta["users"]), json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: its metadata has no readable user list ({e})") from None
    want = set(ids if only is None else only)
    missing = sorted(want - set(ids))
    if missing:
        raise KeyError(f"{path}: no user(s) {missing[:5]}")
    users: dict[str, dict[str, torch.Tensor]] = {u: {} for u in ids if u in want}
    for key, t in tensors.items():
        i, _, name = key.partition(".")
        if ids[int(i)] in want:
            users[ids[int(i)]][name] = t
    return users, {u: info.get(u, {}) for u in users}, {k: v for k, v in meta.items() if k not in ("users", "info")}


@dataclass
class PerFitShifts:
    """A collective shift, P0 and any users' personal shifts, with their config: what `save_pretrained` writes and
    `from_pretrained` reads, usable on a Hugging Face model's own forward and `generate` (`applied`)."""
    config: PerFitConfig
    collective: Shifter
    users: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)
    generator: "ShiftGenerator | None" = None  # the instant path (a user's history -> its shift), if trained
    generator_meta: dict = field(default_factory=dict)

    def save_pretrained(self, folder: str) -> None:
        save_collective(folder, self.config, self.collective)
        if self.users:
            save_users(folder, self.config, self.users, self.info)
        if self.generator is not None:
            from .generator import save_generator  # (generator.py imports batching, which imports this package)

            save_generator(os.path.join(folder, GENERATOR_NAME), self.generator, self.generator_meta, save_safetensors_atomic)

    @classmethod
    def from_pretrained(cls, folder: str, users: list[str] | None = None) -> "PerFitShifts":
        """`users`: load only these users' shifts (default: all saved, if any)."""
        sh, cfg, _ = load_collective(folder)
        got, info = ({}, {})
        if (users is None and os.path.isfile(os.path.join(folder, USERS_NAME))) or users:
            got, info, _ = load_users(folder, users)
        gen, gen_meta = None, {}
        if os.path.isfile(os.path.join(folder, GENERATOR_NAME)):
            from .generator import load_generator

            gen, gen_meta = load_generator(os.path.join(folder, GENERATOR_NAME))
        return cls(cfg, sh, got, info, gen, gen_meta)

    def bank(self, device, capacity: int | None = None) -> ShiftBank:
        return ShiftBank(self.collective, device, capacity or max(len(self.users), 1))

    @contextlib.contextmanager
    def applied(self, model, users: list[str | None], device=None):
        """Within the block, `model`'s (a Hugging Face causal LM) forward and `generate` run with row i's shifts: the
        collective shift plus user users[i]'s personal shift (None or a user without a saved shift: P0), at the prompt
        positions of the first pass only (the prefill; generated tokens are never shifted), as PerFit's own decoder
        does. Prompts must be left-padded (Hugging Face's rule for decoder-only generation)."""
        dev = device or next(model.parameters()).device
        unknown = sorted({u for u in users if u is not None and u not in self.users})
        if unknown:
            raise KeyError(f"no saved shift for user(s) {unknown[:5]}; pass None for the collective shift + P0")
        bank = self.bank(dev, max(len(set(users)), 1))
        slots = [bank.acquire(u, "saved", lambda u=u: self.users[u]) if u is not None else 0 for u in users]
        with on_prefill(model, bank, torch.tensor(slots, device=dev), *self.config.first_last):
            yield


@contextlib.contextmanager
def on_prefill(model, bank: ShiftBank, slots: torch.Tensor, first: int, last: int):
    """The bank's shifts hooked onto `model` for the block: each forward's first pass over a batch (one whose
    attention mask starts a sequence, i.e. no cache is passed) is shifted at each row's prompt positions, found from
    the attention mask (left padding)."""
    def pre(module, args, kwargs):
        if kwargs.get("past_key_values") is not None and _cached_length(kwargs["past_key_values"]) > 0:
            bank.state = None  # a decoding step: nothing to shift
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        B, L = ids.shape
        if B != len(slots):
            raise ValueError(f"the batch has {B} rows for {len(slots)} users")
        lens = mask.sum(1).tolist() if mask is not None else [L] * B
        if mask is not None and bool((mask[:, -1] == 0).any()):
            raise ValueError("shifted generation needs left-padded prompts (tokenizer.padding_side = 'left')")
        index, valid = position_index([int(n) for n in lens], [L - int(n) for n in lens], first, last)
        bank.state = ShiftState(index.to(ids.device), valid.to(ids.device), slots, L)
        return None

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with bank.attached(model):
            yield
    finally:
        handle.remove()
        bank.state = None


def _cached_length(cache) -> int:
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0


__all__ = ["CONFIG_NAME", "COLLECTIVE_NAME", "GENERATOR_NAME", "USERS_NAME", "PerFitShifts", "load_collective", "load_users",
           "on_prefill", "save_collective", "save_users", "shifter_from"]
