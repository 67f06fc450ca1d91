"""The plugin's side that needs no vLLM: a request's admission (its user's shift version, fixed once), its prefix-cache
keys, and which tokens of a flattened continuous batch the shifts act on. The shifts themselves sit in the one bank
(`perfit.method.bank`) and are applied by the one hook (`perfit.method.shifts.shift_hook`) that generation uses too.

vLLM runs one flattened batch of tokens per step: each request contributes the tokens scheduled for it this step,
at absolute positions [computed, computed + scheduled). A token is shifted when it is a prompt token (position < the
request's prompt length: generated tokens never are, also when a preempted request is recomputed) at one of the
run's shifted positions (`shifts.shifted_positions`: the same rule as training and `PerFitModel.generate`). Chunked
prefill therefore needs nothing special: each chunk shifts the positions that fall inside it.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ..config import parse_positions
from ..method.bank import COLLECTIVE, ShiftBank
from ..rundir import CKPT, load_collective, load_run_config, store_path
from ..method.shifts import ShiftState, group_sizes, shifted_positions
from ..store import UserStore

USER_KEY = "perfit_user"  # SamplingParams.extra_args / vllm_xargs key naming a request's user
SHIFT_KEY = "perfit_shift"  # extra_args key the engine sets at admission: the user's shift version ("" for none)


@dataclasses.dataclass
class RunInfo:
    """What the scheduler side needs of a run: its positions and its store (no model, no tensors)."""
    run_dir: str
    first: int
    last: int
    _store: UserStore | None = None

    @classmethod
    def load(cls, run_dir: str) -> "RunInfo":
        cfg = load_run_config(run_dir)
        first, last = parse_positions(cfg.positions)
        return cls(run_dir, first, last)

    @property
    def store(self) -> UserStore | None:
        """The run's user store, None while it has none (opened on first use: a store made later is found)."""
        if self._store is None and os.path.isfile(store_path(self.run_dir)):
            self._store = UserStore(store_path(self.run_dir))
        return self._store

    def version(self, user: str | None) -> str | None:
        """The version of the user's stored shift (None: unknown user or no user: the collective shift alone)."""
        return None if user is None or self.store is None else self.store.version(user)

    def admit(self, extra_args: dict | None) -> dict:
        """A request's extra_args with the version of its user's shift fixed, read once, when the engine admits the
        request: its prefix-cache keys and the worker's shift both follow that one value (`shift_of`)."""
        extra = dict(extra_args or {})
        extra[SHIFT_KEY] = self.version(user_of(extra)) or ""
        return extra

    def shifted(self, prompt_len: int) -> list[int]:
        return shifted_positions(prompt_len, self.first, self.last)

    def block_keys(self, version: str | None, prompt_len: int, start: int, end: int) -> list[tuple]:
        """Prefix-cache keys of the KV block [start, end) of a request admitted with this shift version: a block that
        holds a shifted position carries whose shift it was and which positions were shifted, so no request admitted
        with another version (nor a prompt of another length, whose last positions lie elsewhere) reuses it; block
        hashes chain, so every later block differs too. Blocks before the first shifted position carry nothing and are
        shared by every user. Version ids are never reused (UserStore), so blocks left by a request whose version was
        erased before its prefill (it is then computed with the collective shift, see `acquire`) are reused by
        no later request."""
        nf, nl = group_sizes(prompt_len, self.first, self.last)
        marks = ([f"first{nf}"] if nf and start == 0 else []) + \
                ([f"last@{prompt_len - nl}"] if nl and start <= prompt_len - nl < end else [])
        if not marks:
            return []
        who = version or "collective"
        return [("perfit", f"{who}:{m}") for m in marks]


def user_of(extra_args: dict | None) -> str | None:
    user = (extra_args or {}).get(USER_KEY)
    if user is not None and not isinstance(user, str):
        raise ValueError(f"{USER_KEY} must be a string user id, got {type(user).__name__}")
    return user or None


def shift_of(extra_args: dict | None) -> str | None:
    """The shift version a request was admitted with (None: the collective shift alone)."""
    return (extra_args or {}).get(SHIFT_KEY) or None


def bank_from_run(run_dir: str, device: torch.device | str, capacity: int = 1024) -> ShiftBank:
    """The run's collective shift and P0 in a bank of `capacity` users' slots on `device`, in float32."""
    sh, _ = load_collective(os.path.join(run_dir, CKPT))
    return ShiftBank(sh, device, capacity, torch.float32)


def acquire(bank: ShiftBank, info: RunInfo, user: str | None, version: str | None) -> int:
    """The bank slot of the user's shift of the version its request was admitted with, pinned until `bank.release`:
    that version is on the device, or in the store (current, or replaced less than RETIRED_KEEP_S ago); when it is gone
    (the user was erased after the request was admitted, or retrained long before its prefill) the request gets slot 0,
    the collective shift, never another version."""
    store = info.store
    if store is None:
        return COLLECTIVE
    return bank.acquire(user, version, lambda: store.get_version(user, version))


def plan_tokens(info: RunInfo, prompt_lens, computed, scheduled, slots) -> tuple[list[int], list[int]]:
    """Indices (into the flattened batch) of the tokens to shift and their slots. Request i has scheduled[i] tokens
    this step, at positions computed[i]..computed[i] + scheduled[i] - 1, laid out after request i-1's tokens."""
    index, slot_of = [], []
    start = 0
    for L, c, n, s in zip(prompt_lens, computed, scheduled, slots):
        L, c, n = int(L), int(c), int(n)
        if c < L:
            for p in info.shifted(L):
                if c <= p < c + n:
                    index.append(start + p - c)
                    slot_of.append(s)
        start += n
    return index, slot_of


def step_state(index: list[int], slots: list[int], device) -> ShiftState:
    """The ShiftState of one flattened batch: each planned token a group of its own, with its request's slot."""
    idx = torch.tensor(index, dtype=torch.long).to(device, non_blocking=True).unsqueeze(1)
    return ShiftState(idx, torch.ones_like(idx, dtype=torch.bool), torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True), None)
