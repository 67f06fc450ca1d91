"""Users' personal shifts held on the device between batches, keyed by the version of each stored shift: a version
read from the store decides whether the cached tensors are still the user's, so a user retrained or erased by any
process is served its new state on its next batch."""
from __future__ import annotations

from collections import OrderedDict

import torch

from .store import UserStore


class UserShiftCache:
    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._by_user: OrderedDict[str, tuple[str, dict[str, torch.Tensor]]] = OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._by_user)

    def drop(self, user_id: str) -> None:
        self._by_user.pop(user_id, None)

    def clear(self) -> None:
        self._by_user.clear()

    def resolve(self, store: UserStore, user_ids: list[str], device) -> dict[str, tuple[str, dict[str, torch.Tensor]] | None]:
        """Each user's shift as stored now: (version, tensors on `device`), or None (no stored shift: the stage-1
        shifts). One read of the versions for all of them; the caller carries the result through its whole batch, so
        no answer mixes two states of a user."""
        versions = store.versions(user_ids)
        out: dict[str, tuple[str, dict[str, torch.Tensor]] | None] = {}
        for u in dict.fromkeys(user_ids):
            v = versions.get(u)
            hit = self._by_user.pop(u, None)
            if v is None:
                out[u] = None
                continue
            if hit is None or hit[0] != v:
                t = store.get_version(u, v)
                if t is None:  # replaced or erased since the versions were read: what is stored now, in one read
                    got = store.get_versioned(u)
                    if got is None:
                        out[u] = None
                        continue
                    t, v = got
                hit = (v, {k: x.to(device) for k, x in t.items()})
            self._by_user[u] = hit
            out[u] = hit
        while len(self._by_user) > self.capacity:
            self._by_user.popitem(last=False)
        return out
