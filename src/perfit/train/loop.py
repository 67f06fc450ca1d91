"""One training loop for both stages.

Each personal module trains on its own examples with its own data order (seeded by its user id); step k of the loop
is step k of every user still training, so many users train in one batch while each user's update is exactly what
training it alone would give (loss normalised per user, Adam state and step counts per user, users with no data at a
step left untouched). Frozen states are computed once (`caches`), each pass takes the cheapest equivalent path
(`forward`), and logits are computed at target positions only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import dist
from ..batching import TokenizedExample
from ..faults import fault_point
from ..progress import progress
from ..method.shifts import Shifter
from .caches import compute_frozen_prefix, compute_lower_cache
from .early_stop import EarlyStopping
from .forward import forward_loss
from .optim import MaskedAdamW, schedule


@dataclass
class TrainStats:
    steps: int = 0
    epochs: int = 0
    examples_seen: int = 0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    epoch_losses: list = field(default_factory=list)  # mean token loss per epoch-sized slice of steps, all users
    user_epoch_losses: dict = field(default_factory=dict)  # module -> that user's mean token loss in each of its epochs
    seconds: float = 0.0
    cached_lower_layers: bool = False
    cached_on_disk: bool = False  # the frozen-state cache is memory-mapped on disk
    cached_frozen_prefix: bool = False
    ranks: int = 1  # processes that shared each step (data-parallel under torchrun)
    user_best_epoch: dict = field(default_factory=dict)  # early stopping: module -> the epoch whose shift was kept
    user_val_losses: dict = field(default_factory=dict)  # early stopping: module -> validation loss after each epoch


def _all_reduce_grads(params) -> None:
    """Sum the gradients across ranks (a rank with no rows in a step contributes zeros), in one flat buffer."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = dist.all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in params]))
    off = 0
    for p in params:
        p.grad.copy_(flat[off: off + p.numel()].view_as(p.grad))
        off += p.numel()


def _passes(examples: list[TokenizedExample], rows: list[int], max_rows: int, by_user: bool) -> list[list[int]]:
    """Split a step's rows into forward passes of at most max_rows. With prefix sharing, whole users are packed
    together (a user's prefix then runs once per step); otherwise rows are grouped by length (less padding)."""
    if not by_user:
        rows = sorted(rows, key=lambda i: len(examples[i].ids))
        return [rows[s: s + max_rows] for s in range(0, len(rows), max_rows)]
    per_user: dict[int, list[int]] = {}
    for i in sorted(rows, key=lambda i: len(examples[i].ids)):
        per_user.setdefault(examples[i].module, []).append(i)
    out: list[list[int]] = [[]]
    for mine in per_user.values():
        if out[-1] and len(out[-1]) + len(mine) > max_rows:
            out.append([])
        out[-1] += mine  # a user's rows never exceed batch_size <= max_rows
    return out


@dataclass
class TrainState:
    """Everything needed to continue training exactly where it stopped: the data order is a pure function of the seed
    and the users' ids, so the position in it is the step index."""
    step: int
    tensors: dict  # the shifter's parameters ("param.<name>") and the optimizer's state ("opt.<name>")
    stats: dict  # TrainStats so far and the loss accumulators, JSON-able


def _optimizer(shifter: Shifter, train_collective: bool, lr: float) -> MaskedAdamW:
    """Only the shifts being trained take gradients (the collective one only if `train_collective`)."""
    for p in shifter.collective.parameters():
        p.requires_grad_(train_collective)
    for p in shifter.personal.parameters():
        p.requires_grad_(True)
    return MaskedAdamW(list(shifter.personal.parameters()) + (list(shifter.collective.parameters()) if train_collective else []), lr)


@dataclass
class _Frozen:
    """What never changes during training, computed once for this rank's examples: example index -> its frozen
    prefix states (`frozen`) or the states entering the lowest shifted layer (`lower`); None: not cached."""
    ranks: int
    me: int
    low: int
    frozen: dict | None
    lower: dict | None
    share_prefix: bool

    def rows(self, step) -> list[int]:
        """This rank's rows of a step (data-parallel: the examples i with i % ranks == me)."""
        return [i for _, _, idx in step for i in idx if i % self.ranks == self.me]


def _frozen_states(model, shifter: Shifter, examples: list[TokenizedExample], stats: TrainStats, *, first: int,
                   last: int, pad_id: int, cache_max_bytes: int, share_prefix: bool, frozen_prefix: bool,
                   disk_cache_dir: str, disk_cache_max_bytes: int, data_parallel: bool) -> _Frozen:
    # data-parallel (torchrun): this rank runs the examples i with i % world == rank of every step
    ranks, me = (dist.world(), dist.rank()) if data_parallel and dist.enabled() else (1, 0)
    mine = [i for i in range(len(examples)) if i % ranks == me]
    low = min(shifter.layers)
    own = [examples[i] for i in mine]
    frozen = compute_frozen_prefix(model, own, low, last, pad_id, cache_max_bytes) if frozen_prefix and first == 0 else None
    lower = None if frozen is not None else compute_lower_cache(model, own, low, pad_id, cache_max_bytes,
                                                                disk_dir=disk_cache_dir, disk_max_bytes=disk_cache_max_bytes)
    stats.ranks = ranks
    frozen = None if frozen is None else dict(zip(mine, frozen))
    lower = None if lower is None else dict(zip(mine, lower))
    stats.cached_lower_layers = lower is not None or frozen is not None
    stats.cached_on_disk = bool(lower) and next(iter(lower.values())).untyped_storage().filename is not None
    stats.cached_frozen_prefix = frozen is not None
    return _Frozen(ranks, me, low, frozen, lower, share_prefix and frozen is None)


class _Validation:
    """Early stopping's place in the loop: each user is scored before training and at the step that ends each of its
    epochs, and users that stopped take no more steps."""

    def __init__(self, early: EarlyStopping, examples: list[TokenizedExample], steps: list):
        self.early = early
        early.epoch_end(sorted({e.module for e in examples}), 0)
        self.ends = {(u, e): k for k, step in enumerate(steps) for u, e, _ in step}  # a user's epoch ends at its last step

    def still_training(self, step) -> list:
        return [(u, e, idx) for u, e, idx in step if u not in self.early.stopped]

    def after_step(self, step, k: int) -> None:
        for u, e, _ in step:
            if self.ends[(u, e)] == k:
                self.early.epoch_end([u], e + 1)

    def finish(self, stats: TrainStats) -> None:
        stats.user_best_epoch, stats.user_val_losses = self.early.restore(), self.early.history


class _Accounting:
    """The losses and counts of the steps taken, with what resuming needs to continue them exactly."""

    def __init__(self, stats: TrainStats, t0: float, n_steps: int, epochs: int):
        self.stats, self.t0, self.n_steps = stats, t0, n_steps
        self.per_epoch = max(1, -(-n_steps // epochs))
        self.user_acc: dict[tuple[int, int], list[float]] = {}  # (module, epoch) -> [loss sum, tokens]
        self.acc = [0.0, 0]
        self.before = 0.0  # seconds spent before a resume

    def resume(self, st: dict) -> None:
        stats = self.stats
        stats.steps, stats.examples_seen, stats.first_loss = st["steps"], st["examples_seen"], st["first_loss"]
        stats.epoch_losses = list(st["epoch_losses"])
        self.user_acc = {tuple(map(int, k.split(":"))): v for k, v in st["user_acc"].items()}
        self.before = st["seconds"]

    def state(self, k: int, shifter: Shifter, opt: MaskedAdamW) -> TrainState:
        stats = self.stats
        tensors = {f"param.{n}": p.detach().clone() for n, p in shifter.named_parameters()}
        tensors |= {f"opt.{k2}": v for k2, v in opt.state_dict().items()}
        return TrainState(k, tensors, {"steps": stats.steps, "examples_seen": stats.examples_seen,
                                       "first_loss": stats.first_loss, "epoch_losses": stats.epoch_losses,
                                       "user_acc": {f"{u}:{e}": v for (u, e), v in self.user_acc.items()},
                                       "seconds": self.before + time.perf_counter() - self.t0})

    def add_users(self, tokens_of: dict, epoch_of: dict, sums: torch.Tensor) -> None:
        for u in tokens_of:
            a = self.user_acc.setdefault((u, epoch_of[u]), [0.0, 0])
            a[0] += float(sums[u, 0])
            a[1] += int(sums[u, 1])

    def step_done(self, k: int, step, total: float, ntok: int) -> tuple[float, bool]:
        """Counts step k; returns its mean token loss and whether it ended an epoch-sized slice of steps."""
        stats = self.stats
        stats.steps += 1
        stats.examples_seen += sum(len(idx) for _, _, idx in step)
        mean = total / max(ntok, 1)
        stats.first_loss = mean if stats.steps == 1 else stats.first_loss
        stats.last_loss = mean
        self.acc = [self.acc[0] + total, self.acc[1] + ntok]
        if (k + 1) % self.per_epoch == 0 or k + 1 == self.n_steps:
            stats.epoch_losses.append(self.acc[0] / max(self.acc[1], 1))
            self.acc = [0.0, 0]
            return mean, True
        return mean, False

    def finish(self) -> TrainStats:
        stats = self.stats
        for (u, e), (s, n) in sorted(self.user_acc.items()):
            stats.user_epoch_losses.setdefault(u, []).append(s / max(n, 1))
        stats.seconds = self.before + time.perf_counter() - self.t0
        return stats


def _restore(resume: TrainState, shifter: Shifter, opt: MaskedAdamW, acct: _Accounting) -> int:
    """Parameters, optimizer and accounting as they were at `resume`; returns the step to continue from."""
    with torch.no_grad():
        for n, p in shifter.named_parameters():
            p.copy_(resume.tensors[f"param.{n}"])
    opt.load_state_dict({k[4:]: v for k, v in resume.tensors.items() if k.startswith("opt.")})
    acct.resume(resume.stats)
    return resume.step


def _backward(model, shifter: Shifter, examples: list[TokenizedExample], step, fz: _Frozen, opt: MaskedAdamW,
              pad_id: int, first: int, last: int, max_rows: int) -> tuple[dict, torch.Tensor]:
    """The gradients of one step (summed across ranks). Returns each user's target tokens in the step and the
    per-user [token-loss sum, tokens]."""
    # each user's loss is the mean over its own target tokens in this step
    tokens_of = {u: sum(len(examples[i].ids) - examples[i].prompt_len for i in idx) for u, _, idx in step}
    opt.zero_grad()
    sums = torch.zeros(shifter.num_users, 2, dtype=torch.float64)  # per user: token-loss sum, tokens
    for part in _passes(examples, fz.rows(step), max_rows, fz.share_prefix):
        rows = [examples[i] for i in part]
        loss, row_sums, row_tok = forward_loss(
            model, shifter, rows, [1.0 / tokens_of[r.module] for r in rows], pad_id, first, last,
            None if fz.lower is None else [fz.lower[i] for i in part], fz.low, share_prefix=fz.share_prefix,
            frozen=None if fz.frozen is None else [fz.frozen[i] for i in part])
        loss.backward()
        for r, s, n in zip(rows, row_sums.tolist(), row_tok):
            sums[r.module] += torch.tensor([s, n], dtype=torch.float64)
    if fz.ranks > 1:  # the gradient of the whole step: every rank then makes the same update
        _all_reduce_grads(opt.params)
        dist.all_reduce_sum(sums)
    return tokens_of, sums


def train_shifts(model, shifter: Shifter, examples: list[TokenizedExample], *, epochs: int, batch_size: int, lr: float,
                 train_collective: bool, pad_id: int, first: int, last: int, seed: int = 0, max_rows: int = 32,
                 cache_max_bytes: int = 2 * 1024**3, share_prefix: bool = True, frozen_prefix: bool = True,
                 disk_cache_dir: str = "", disk_cache_max_bytes: int = 0, desc: str = "training",
                 resume: TrainState | None = None, on_epoch: Callable[[TrainState], None] | None = None,
                 data_parallel: bool = False, val_examples: list[TokenizedExample] | None = None,
                 patience: int = 2, fault: str = "train.step") -> TrainStats:
    """Train the personal modules (and the collective one if `train_collective`) on `examples`, each example
    updating the personal module `example.module`. The shifter must be attached to `model`.
    `on_epoch(state)` is called at the end of every epoch-sized slice of steps; `resume` continues from such a state
    to the same result as an uninterrupted run. `data_parallel` (under torchrun): each rank runs its share of every
    step's rows and the gradients are summed across ranks, so every rank ends with the one-process result."""
    stats = TrainStats(epochs=epochs)
    t0 = time.perf_counter()
    if not examples or epochs == 0:
        return stats
    max_rows = max(max_rows, batch_size)
    opt = _optimizer(shifter, train_collective, lr)
    fz = _frozen_states(model, shifter, examples, stats, first=first, last=last, pad_id=pad_id,
                        cache_max_bytes=cache_max_bytes, share_prefix=share_prefix, frozen_prefix=frozen_prefix,
                        disk_cache_dir=disk_cache_dir, disk_cache_max_bytes=disk_cache_max_bytes,
                        data_parallel=data_parallel)
    steps = schedule(examples, epochs, batch_size, seed)
    val = None if not val_examples else _Validation(
        EarlyStopping(model, shifter, val_examples, patience, pad_id, first, last, max_rows), examples, steps)
    acct = _Accounting(stats, t0, len(steps), epochs)
    start = 0 if resume is None else _restore(resume, shifter, opt, acct)
    bar = progress(steps[start:], desc=desc, initial=start, total=len(steps))
    try:
        for k, step in enumerate(bar, start=start):
            if val is not None:  # users that stopped take no more steps
                step = val.still_training(step)
                if not step:
                    continue
            tokens_of, sums = _backward(model, shifter, examples, step, fz, opt, pad_id, first, last, max_rows)
            acct.add_users(tokens_of, {u: e for u, e, _ in step}, sums)
            total, ntok = float(sums[:, 0].sum()), int(sums[:, 1].sum())
            active = torch.zeros(shifter.num_users, dtype=torch.bool)
            active[list(tokens_of)] = True
            opt.step(active)
            if val is not None:
                val.after_step(step, k)
            mean, epoch_end = acct.step_done(k, step, total, ntok)
            if epoch_end and on_epoch is not None and k + 1 < len(steps):
                on_epoch(acct.state(k + 1, shifter, opt))
            bar.set_postfix(loss=f"{mean:.3f}", refresh=False)
            if fault:  # the fault tests count steps of real training; the plan's timed pass passes ""
                fault_point(fault)
    finally:
        for p in shifter.parameters():
            p.requires_grad_(False)
    if val is not None:
        val.finish(stats)
    return acct.finish()
