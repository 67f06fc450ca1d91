"""Users' shifts on a device, as the factors the hook multiplies by, computed once per user and shift version: the
one place where the embedded engine's generation and the vLLM plugin keep them.

A slot holds one user's personal shift (R, W - R, b per layer); slot 0 holds P0, the personal shift every user starts
from, which users without a stored shift get with the collective shift (`PerFitModel.generate`'s rule). A slot is keyed
by (user, version): a request gets the slot of the version it was admitted with, so a retrained user's next request
gets a fresh slot and one admitted before the retrain keeps the shift it was admitted with. Slots in use by a pass
still to run are pinned; the least recently used unpinned slot is reused first. Slots grow on demand up to capacity.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch

from ..errors import RunStateError
from .shifts import LowRankShift, Shifter, ShiftSource, apply_shift, compute_dtype, user_tensor_names

COLLECTIVE = 0  # slot of P0


class ShiftBank(ShiftSource):
    def __init__(self, collective: Shifter, device: torch.device | str, capacity: int = 1024,
                 dtype: torch.dtype | None = None):
        sh = collective
        self.layers = list(sh.layers)
        self.state = None
        first = sh.personal[str(self.layers[0])]
        self.hidden, self.rank = first.hidden, first.rank
        self.device = torch.device(device)
        self.param_dtype = first.weight.dtype  # a user's R is orthonormalised in it, as the Shifter would
        self.dtype = dtype or compute_dtype(first.weight.dtype)  # float32 at least; float64 for float64 shifts
        self.capacity = capacity
        self.collective = {l: tuple(t[0].to(self.device) for t in sh.collective[str(l)].factors(self.dtype))
                           for l in self.layers if str(l) in sh.collective}
        p0 = {l: tuple(t[:1] for t in sh.personal[str(l)].factors(self.dtype)) for l in self.layers}
        self.R = {l: p0[l][0].to(self.device) for l in self.layers}  # [slots, r, d]
        self.WmR = {l: p0[l][1].to(self.device) for l in self.layers}
        self.b = {l: p0[l][2].to(self.device) for l in self.layers}  # [slots, r]
        self.slot_of: OrderedDict[tuple[str, str], int] = OrderedDict()  # (user, version) -> slot, LRU first
        self.pins = [0]
        self.free: list[int] = []
        self.dropped: set[int] = set()  # slots dropped while pinned: freed at their last release
        self._lock = threading.RLock()  # a server's trainer drops users while its engine generates
        self.loads = 0  # shifts read in (the cache's misses)
        self.gone = 0  # acquisitions whose version could no longer be read (erased users): slot 0 given

    def __len__(self) -> int:
        """Users' shifts held."""
        return len(self.slot_of)

    @property
    def slots(self) -> int:
        return self.R[self.layers[0]].shape[0]

    def holds(self, user: str, version: str) -> bool:
        return (user, version) in self.slot_of

    def acquire(self, user: str | None, version: str | None,
                load: Callable[[], dict[str, torch.Tensor] | None] | None = None) -> int:
        """The slot holding `user`'s shift of `version`, pinned until `release`; on a miss `load()` gives its tensors
        (`Shifter.user_state`'s keys). Slot 0 (never pinned) when there is no user or version, or `load` finds none."""
        with self._lock:
            if user is None or not version:
                return COLLECTIVE
            key = (user, version)
            slot = self.slot_of.get(key)
            if slot is None:
                tensors = load() if load is not None else None
                if tensors is None:
                    self.gone += 1
                    return COLLECTIVE
                slot = self._free_slot()
                try:
                    self._write(slot, user, tensors)
                except Exception:
                    self.free.append(slot)
                    raise
                self.loads += 1
                self.slot_of[key] = slot
            self.slot_of.move_to_end(key)
            self.pins[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        if slot == COLLECTIVE:
            return
        with self._lock:
            self.pins[slot] -= 1
            if self.pins[slot] == 0 and slot in self.dropped:
                self.dropped.discard(slot)
                self.free.append(slot)

    def drop(self, user: str) -> None:
        """Forget every version of `user` held here (its slots return to the free list)."""
        with self._lock:
            for key in [k for k in self.slot_of if k[0] == user]:
                slot = self.slot_of.pop(key)
                if self.pins[slot] == 0:
                    self.free.append(slot)
                else:
                    self.dropped.add(slot)

    def clear(self) -> None:
        for user in {k[0] for k in self.slot_of}:
            self.drop(user)

    def _free_slot(self) -> int:
        if self.free:
            return self.free.pop()
        if self.slots <= self.capacity:
            return self._grow()
        for key, slot in self.slot_of.items():  # least recently used first
            if self.pins[slot] == 0:
                del self.slot_of[key]
                return slot
        raise RuntimeError(f"all {self.capacity} device slots for users' shifts hold users of passes still to run; "
                           f"raise the capacity (PERFIT_VLLM_MAX_USERS above vLLM's max_num_seqs, or "
                           f"max_cached_users above user_group_size)")

    def _grow(self) -> int:
        n = self.slots
        add = min(max(n - 1, 1), self.capacity + 1 - n)  # doubling the users' slots
        for t in (self.R, self.WmR, self.b):
            for l in self.layers:
                t[l] = torch.cat([t[l], t[l].new_zeros((add,) + tuple(t[l].shape[1:]))])
        self.pins += [0] * add
        self.free += list(range(n + add - 1, n, -1))
        return n

    @torch.no_grad()
    def _write(self, slot: int, user: str, tensors: dict[str, torch.Tensor]) -> None:
        for l in self.layers:
            names = user_tensor_names(l)
            missing = [k for k in names.values() if k not in tensors]
            if missing:
                raise RunStateError(f"user {user!r}: its stored shift lacks {missing[0]} (the run shifts layers {self.layers})")
            m = LowRankShift(1, self.hidden, self.rank, init=None).to(self.param_dtype)
            try:
                m.load_slice(0, {n: tensors[k] for n, k in names.items()})
            except RuntimeError as e:
                raise RunStateError(f"user {user!r}: its stored shift does not fit the run's shapes ({e})") from None
            R, WmR, b = m.factors(self.dtype)
            self.R[l][slot].copy_(R[0])
            self.WmR[l][slot].copy_(WmR[0])
            self.b[l][slot].copy_(b[0])

    def delta(self, layer: int, h: torch.Tensor, users: torch.Tensor | None, use_collective: bool = True):
        """The shifts of h [G, P, d] at `layer`, group g with slot users[g] (see `shift_hook`)."""
        dt = compute_dtype(h.dtype, self.dtype)
        h = h.to(dt)
        G = h.shape[0]
        out = None
        if use_collective and layer in self.collective:
            R, WmR, b = (t.to(dt) for t in self.collective[layer])
            out = apply_shift(h, R.expand(G, -1, -1), WmR.expand(G, -1, -1), b.expand(G, -1))
        if users is not None:
            pd = apply_shift(h, self.R[layer][users].to(dt), self.WmR[layer][users].to(dt), self.b[layer][users].to(dt))
            out = pd if out is None else out + pd
        return out
