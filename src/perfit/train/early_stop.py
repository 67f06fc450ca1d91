"""Per-user early stopping inside the batched loop. Each user's validation examples (its last history items) are
scored at the start and at the end of each of its own epochs (users' epochs end at different steps when their
histories differ); the user's shift at its best validation loss is what training returns, and a user stops training
after `patience` epochs without improvement while the others go on."""
from __future__ import annotations

import torch

from ..batching import TokenizedExample
from ..method.shifts import Shifter
from .forward import forward_loss


class EarlyStopping:
    def __init__(self, model, shifter: Shifter, val: list[TokenizedExample], patience: int, pad_id: int, first: int,
                 last: int, max_rows: int = 32):
        self.model, self.shifter, self.patience = model, shifter, patience
        self.pad_id, self.first, self.last, self.max_rows = pad_id, first, last, max_rows
        self.val_of: dict[int, list[TokenizedExample]] = {}
        for e in val:
            self.val_of.setdefault(e.module, []).append(e)
        self.best: dict[int, tuple[float, int, dict]] = {}  # user -> (loss, epoch, its personal module then)
        self.since: dict[int, int] = {}
        self.stopped: set[int] = set()
        self.history: dict[int, list[float]] = {}

    @torch.no_grad()
    def _losses(self, users: list[int]) -> dict[int, float]:
        rows = [e for u in users for e in self.val_of.get(u, [])]
        sums: dict[int, list[float]] = {}
        for s in range(0, len(rows), self.max_rows):
            part = rows[s: s + self.max_rows]
            _, row_sums, row_tok = forward_loss(self.model, self.shifter, part, [0.0] * len(part), self.pad_id, self.first,
                                                self.last, None, min(self.shifter.layers))
            for r, x, n in zip(part, row_sums.tolist(), row_tok):
                a = sums.setdefault(r.module, [0.0, 0])
                a[0] += x
                a[1] += n
        return {u: a[0] / max(a[1], 1) for u, a in sums.items()}

    def _snapshot(self, u: int) -> dict:
        return {l: {k: v.clone() for k, v in self.shifter.personal[str(l)].slice_state(u).items()} for l in self.shifter.layers}

    def epoch_end(self, users: list[int], epoch: int) -> None:
        """Score these users after their epoch `epoch` (0: before any training); keep each one's best."""
        for u, loss in self._losses([u for u in users if u in self.val_of]).items():
            self.history.setdefault(u, []).append(loss)
            if u not in self.best or loss < self.best[u][0]:
                self.best[u], self.since[u] = (loss, epoch, self._snapshot(u)), 0
            else:
                self.since[u] += 1
                if self.since[u] >= self.patience:
                    self.stopped.add(u)

    def restore(self) -> dict[int, int]:
        """Every user's personal module back at its best epoch; returns {user: that epoch}."""
        for u, (_, _, snap) in self.best.items():
            for l, state in snap.items():
                self.shifter.personal[str(l)].load_slice(u, state)
        return {u: epoch for u, (_, epoch, _) in self.best.items()}
