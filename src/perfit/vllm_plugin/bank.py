"""The plugin's side that needs no vLLM: a run's shifts kept on the device for many users, which tokens of a flattened
continuous batch they act on, and the layer hook that applies them.

vLLM runs one flattened batch of tokens per step: each request contributes the tokens scheduled for it this step,
at absolute positions [computed, computed + scheduled). A token is shifted when it is a prompt token (position < the
request's prompt length: generated tokens never are, also when a preempted request is recomputed) at one of the
run's shifted positions (`shifts.shifted_positions`: the same rule as training and `PerFitModel.generate`). Chunked
prefill therefore needs nothing special: each chunk shifts the positions that fall inside it.
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict

import torch

from ..config import parse_positions
from ..errors import RunStateError
from ..rundir import CKPT, load_collective, load_run_config, store_path
from ..shifts import LowRankShift, Shifter, apply_shift, group_sizes, shifted_positions
from ..store import UserStore

USER_KEY = "perfit_user"  # SamplingParams.extra_args / vllm_xargs key naming a request's user
SHIFT_KEY = "perfit_shift"  # extra_args key the engine sets at admission: the user's shift version ("" for none)
COLLECTIVE = 0  # slot of P0: users without a stored shift get the collective shift + P0 (PerFitModel.generate's rule)


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
        erased before its prefill (it is then computed with the collective shift, see ShiftBank.acquire) are reused by
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


class ShiftBank:
    """The collective shift and up to `capacity` users' personal shifts on the device, as precomputed factors
    (R, W - R, b) in float32 slots; slot 0 is P0. A slot is keyed by (user, version of the shift it holds): a request
    gets the slot of the version it was admitted with, so a retrained user's next request gets a fresh slot and one
    admitted before the retrain the shift it was admitted with. Slots in use by a request still in prefill are pinned;
    the least recently used unpinned slot is reused first."""

    def __init__(self, collective: Shifter, info: RunInfo, device: torch.device | str, capacity: int = 1024):
        sh, self.info = collective, info
        self.layers = list(sh.layers)
        first = sh.personal[str(self.layers[0])]
        self.hidden, self.rank = first.hidden, first.rank
        self.device = torch.device(device)
        self.capacity = capacity
        f32 = torch.float32
        self.collective = {l: tuple(t[0].to(self.device) for t in sh.collective[str(l)].factors(f32))
                           for l in self.layers if str(l) in sh.collective}
        self.R, self.WmR, self.b = {}, {}, {}
        for l in self.layers:
            R, WmR, b = sh.personal[str(l)].factors(f32)
            self.R[l] = torch.zeros(capacity + 1, self.rank, self.hidden, dtype=f32, device=self.device)
            self.WmR[l] = torch.zeros_like(self.R[l])
            self.b[l] = torch.zeros(capacity + 1, self.rank, dtype=f32, device=self.device)
            self.R[l][COLLECTIVE], self.WmR[l][COLLECTIVE], self.b[l][COLLECTIVE] = R[0], WmR[0], b[0]
        self.slot_of: OrderedDict[tuple[str, str], int] = OrderedDict()  # (user, version) -> slot, LRU order
        self.pins = [0] * (capacity + 1)
        self.free = list(range(capacity, 0, -1))
        self.loads = 0  # shifts read from the store (a metric for the cache's hit rate)
        self.gone = 0  # requests whose admitted version had left the store before their prefill (erased users)

    @classmethod
    def from_run(cls, run_dir: str, device: torch.device | str, capacity: int = 1024) -> "ShiftBank":
        sh, _ = load_collective(os.path.join(run_dir, CKPT))
        return cls(sh, RunInfo.load(run_dir), device, capacity)

    def acquire(self, user: str | None, version: str | None) -> int:
        """The slot holding the user's shift of the version its request was admitted with, pinned until `release`
        (slot 0, never pinned: no stored shift). That version is on the device, or in the store (current, or replaced
        less than RETIRED_KEEP_S ago); when it is gone (the user was erased after the request was admitted, or
        retrained long before its prefill) the request gets slot 0, the collective shift, never another version."""
        if user is None or not version or self.info.store is None:
            return COLLECTIVE
        key = (user, version)
        slot = self.slot_of.get(key)
        if slot is None:
            tensors = self.info.store.get_version(user, version)
            if tensors is None:
                self.gone += 1
                return COLLECTIVE
            slot = self._free_slot()
            self._write(slot, user, tensors)
            self.loads += 1
            self.slot_of[key] = slot
        self.slot_of.move_to_end(key)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot != COLLECTIVE:
            self.pins[slot] -= 1

    def _free_slot(self) -> int:
        if self.free:
            return self.free.pop()
        for key, slot in self.slot_of.items():  # least recently used first
            if self.pins[slot] == 0:
                del self.slot_of[key]
                return slot
        raise RuntimeError(f"PerFit vLLM plugin: all {self.capacity} device slots hold users of requests still in "
                           f"prefill; raise PERFIT_VLLM_MAX_USERS above vLLM's max_num_seqs")

    @torch.no_grad()
    def _write(self, slot: int, user: str, tensors: dict[str, torch.Tensor]) -> None:
        for l in self.layers:
            names = {n: f"layer.{l}.{n}" for n in ("rotate_raw", "weight", "bias")}
            missing = [k for k in names.values() if k not in tensors]
            if missing:
                raise RunStateError(f"user {user!r}: its stored shift lacks {missing[0]} (the run shifts layers {self.layers})")
            m = LowRankShift(1, self.hidden, self.rank, init=None)
            try:
                m.load_slice(0, {n: tensors[k] for n, k in names.items()})
            except RuntimeError as e:
                raise RunStateError(f"user {user!r}: its stored shift does not fit the run's shapes ({e})") from None
            R, WmR, b = m.factors(torch.float32)
            self.R[l][slot].copy_(R[0])
            self.WmR[l][slot].copy_(WmR[0])
            self.b[l][slot].copy_(b[0])

    def delta(self, layer: int, h: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The shift of tokens h [T, d] (float32) at `layer`, each token with its request's slot [T]."""
        x = h.unsqueeze(1)
        out = apply_shift(x, self.R[layer][slots], self.WmR[layer][slots], self.b[layer][slots])
        if layer in self.collective:
            R, WmR, b = self.collective[layer]
            T = h.shape[0]
            out = out + apply_shift(x, R.expand(T, -1, -1), WmR.expand(T, -1, -1), b.expand(T, -1))
        return out.squeeze(1)


@dataclasses.dataclass
class StepPlan:
    """The tokens of one flattened batch to shift: their indices and each one's slot (on the device)."""
    index: torch.Tensor
    slots: torch.Tensor


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


def layer_hook(bank: ShiftBank, layer: int, current):
    """A forward hook for decoder layer `layer` that adds each planned token's shift to the layer's output.
    `current()` gives this step's StepPlan or None. vLLM's decoder layers return (hidden, residual) and the next
    layer normalises their sum, so the layer's output in Hugging Face's sense is hidden + residual: the shift is
    computed from that sum and added to the residual."""
    def hook(module, args, output):
        plan = current()
        if plan is None:
            return None
        if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
            hidden, residual = output
            h = hidden[plan.index].float() + residual[plan.index].float()
            d = bank.delta(layer, h, plan.slots)
            return hidden, residual.index_add(0, plan.index, d.to(residual.dtype))
        hidden = output[0] if isinstance(output, tuple) else output
        d = bank.delta(layer, hidden[plan.index].float(), plan.slots)
        hidden = hidden.index_add(0, plan.index, d.to(hidden.dtype))
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
    return hook
