"""The optimizer and the data order: per-user Adam state and per-user shuffles, so that training many users in one
batched loop updates each user exactly as training it alone would."""
from __future__ import annotations

import random

import torch

from ..batching import TokenizedExample


class MaskedAdamW:
    """AdamW (no weight decay) over stacked parameters whose leading dim indexes modules (users).
    `step(active)` updates only the active modules, each with its own step count, exactly as torch's
    AdamW would update that module trained alone."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = list(params), lr, betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = [torch.zeros(p.shape[0], dtype=torch.float64) for p in self.params]

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        for p, m, v, t in zip(self.params, self.m, self.v, self.t):
            if p.grad is None:
                continue
            if active is None:
                a = torch.ones(p.shape[0], dtype=torch.bool)
            elif active.numel() == p.shape[0]:
                a = active.cpu()
            else:  # a shared (collective) module trains whenever anyone does
                a = active.any().reshape(1).cpu()
            t += a.double()
            shape = (-1,) + (1,) * (p.dim() - 1)
            am = a.to(p.device).view(shape)
            g = p.grad
            m.copy_(torch.where(am, m * self.b1 + g * (1 - self.b1), m))
            v.copy_(torch.where(am, v * self.b2 + g * g * (1 - self.b2), v))
            tc = t.clamp(min=1)
            bc1 = (1 - self.b1 ** tc).to(p.device, p.dtype).view(shape)
            bc2 = (1 - self.b2 ** tc).to(p.device, p.dtype).view(shape)
            upd = (m / bc1) / ((v / bc2).sqrt() + self.eps)
            p.sub_(torch.where(am, self.lr * upd, torch.zeros_like(upd)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (m, v, t) in enumerate(zip(self.m, self.v, self.t)):
            out |= {f"m.{i}": m.detach().clone(), f"v.{i}": v.detach().clone(), f"t.{i}": t.clone()}
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i in range(len(self.params)):
            self.m[i].copy_(state[f"m.{i}"])
            self.v[i].copy_(state[f"v.{i}"])
            self.t[i].copy_(state[f"t.{i}"])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def schedule(examples: list[TokenizedExample], epochs: int, batch_size: int, seed: int) -> list[list[tuple[int, int, list[int]]]]:
    """steps[k] = the per-user batches of global step k, as (module, the user's epoch, example indices). Each user's
    order is shuffled by a generator seeded with (seed, user id), so it never depends on the other users."""
    by_user: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_user.setdefault(ex.module, []).append(i)
    per_user = [[(u, e, b) for e, b in user_batches(idx, epochs, batch_size, seed, examples[idx[0]].key)]
                for u, idx in sorted(by_user.items())]
    n = max((len(s) for s in per_user), default=0)
    return [[s[k] for s in per_user if k < len(s)] for k in range(n)]


def user_batches(items: list, epochs: int, batch_size: int, seed: int, key: str) -> list[tuple[int, list]]:
    """One user's batches over `epochs`, as (epoch, batch): the items reshuffled each epoch by a generator seeded with
    (seed, the user's id) alone. PerFit's batched loop and the per-user LoRA baselines both order a user's data so."""
    rng = random.Random(f"{seed}:{key}")
    out: list[tuple[int, list]] = []
    for e in range(epochs):
        order = list(items)
        rng.shuffle(order)
        out += [(e, order[i: i + batch_size]) for i in range(0, len(order), batch_size)]
    return out
