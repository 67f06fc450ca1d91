"""The shift generator's episodic training on the stage-1 users (never a test user, never a query).

Each episode is one stage-1 user: its last-shuffled `gen_targets` items are the targets, the rest the profile the
generator reads; the targets' next-token loss, through the frozen model with the collective shift and the generated
personal shift, trains the generator. Every `gen_users_per_step` users make one step. Some stage-1 users are held out
from its training (their last items the targets, the rest the profile): the epoch whose held-out loss is lowest is kept,
and the generator stays at P0 (head zero) if no epoch beats P0 there. Item features and the frozen states entering the
lowest shifted layer are computed once, in one pass.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass

import torch

from ..backbone import text_config
from ..batching import tokenize_examples
from ..data import DataError
from ..method.generator import GeneratorSpec, ShiftGenerator, item_features, personal_weights
from ..progress import progress
from ..prompts import Example
from ..method.shifts import Shifter
from .forward import forward_loss

log = logging.getLogger("perfit")


def split_users(users: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out): a user is held out by a hash of (seed, its id), so the split never depends on the others."""
    def h(u: str) -> float:
        return int(hashlib.sha256(f"{seed}:{u}".encode()).hexdigest()[:8], 16) / 2**32
    held = [u for u in users if h(u) < fraction]
    if not held and len(users) >= 4 and fraction > 0:
        held = [min(users, key=h)]
    if len(users) - len(held) < 2:  # too few to hold any out: the last epoch is kept
        held = []
    return [u for u in users if u not in held], held


def _episode_loss(model, sh: Shifter, gen: ShiftGenerator, p0: dict, feats: torch.Tensor, ex, lower, episodes,
                  pad_id: int, first: int, last: int, low: int, max_rows: int, backward: bool) -> tuple[float, int]:
    """Sum of token losses and tokens over `episodes` [(profile item idx, target item idx)], one personal module per
    episode; with `backward`, each user's loss is its mean token loss over the episodes and gradients reach `gen`."""
    z = torch.stack([feats[p].mean(0) for p, _ in episodes]).to(next(gen.parameters()).device)
    given = personal_weights(p0, gen(z))
    rows = [(k, i) for k, (_, tg) in enumerate(episodes) for i in tg]
    tokens = {k: sum(len(ex[i].ids) - ex[i].prompt_len for i in tg) for k, (_, tg) in enumerate(episodes)}
    total, ntok = 0.0, 0
    for s in range(0, len(rows), max_rows):
        part = rows[s: s + max_rows]
        batch = []
        for k, i in part:
            r = ex[i]
            batch.append(type(r)(r.ids, r.prompt_len, k, r.key))
        w = [1.0 / (tokens[k] * len(episodes)) for k, _ in part]
        with sh.personal_given(given):
            loss, sums, toks = forward_loss(model, sh, batch, w, pad_id, first, last,
                                            None if lower is None else [lower[i] for _, i in part], low)
        if backward:
            loss.backward(retain_graph=s + max_rows < len(rows))
        total, ntok = total + float(sums.sum()), ntok + sum(toks)
    return total, ntok


@dataclass
class EpisodeData:
    """What the generator's training reads, computed once: the stage-1 users' tokenized items, their features and the
    frozen states entering the lowest shifted layer (None: recomputed each pass), and the held-out split."""
    ex: list
    feats: torch.Tensor
    lower: list | None
    idx_of: dict[str, list[int]]
    train_users: list[str]
    held: list[str]
    seconds: float


def episode_data(model, tok, cfg, per_user: dict[str, list[Example]], cache_max_bytes: int) -> EpisodeData:
    t0 = time.perf_counter()
    users = sorted(u for u, exs in per_user.items() if len(exs) >= 2)
    train_users, held = split_users(users, cfg.gen_holdout_fraction, cfg.seed)
    if len(train_users) < 2:
        raise DataError([f"the shift generator needs at least 2 stage-1 users with 2 or more items each "
                         f"(user_others.json); found {len(users)}"])
    ex = tokenize_examples(tok, [e for u in users for e in per_user[u]], cfg.max_length)
    idx_of, k = {}, 0
    for u in users:
        idx_of[u] = list(range(k, k + len(per_user[u])))
        k += len(per_user[u])
    low = min(cfg.layers)
    need = sum(len(e.ids) for e in ex) * text_config(model).hidden_size * next(model.parameters()).element_size()
    feats, lower = item_features(model, ex, cfg.layers, tok.pad_token_id, lower_layer=low if need <= cache_max_bytes else None)
    return EpisodeData(ex, feats, lower, idx_of, train_users, held, time.perf_counter() - t0)


def _new_generator(model, c, collective: Shifter, data: EpisodeData) -> ShiftGenerator:
    """A fresh generator whose input standardisation is fitted to the training users' mean features."""
    device = next(model.parameters()).device
    low = min(c.layers)
    d = collective.personal[str(low)].hidden
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    gen = ShiftGenerator(GeneratorSpec(d, list(c.layers), collective.personal[str(low)].rank, c.gen_width,
                                       c.gen_dropout)).to(device, dtype)
    torch.manual_seed(c.seed)  # after the initialisation: it seeds the dropout of training
    gen.set_standardisation(torch.stack([data.feats[data.idx_of[u]].mean(0) for u in data.train_users]).to(device, dtype))
    return gen


class _Episodes:
    """Episodes through the frozen model with the collective shift and the generated personal shifts, `B` users at a
    time: the held-out loss and one epoch of training."""

    def __init__(self, model, gen: ShiftGenerator, sh: Shifter, p0: dict, data: EpisodeData, pad_id: int, first: int,
                 last: int, low: int, rows_per_pass: int, B: int):
        self.model, self.gen, self.sh, self.p0, self.data = model, gen, sh, p0, data
        self.pad_id, self.first, self.last, self.low, self.rows_per_pass, self.B = pad_id, first, last, low, rows_per_pass, B

    def _loss(self, eps, backward: bool) -> tuple[float, int]:
        d = self.data
        return _episode_loss(self.model, self.sh, self.gen, self.p0, d.feats, d.ex, d.lower, eps, self.pad_id,
                             self.first, self.last, self.low, self.rows_per_pass, backward=backward)

    def held_out_loss(self, val_eps) -> float | None:
        if not val_eps:
            return None
        self.gen.eval()
        tot, n = 0.0, 0
        with torch.no_grad(), self.sh.attached(self.model):
            for s in range(0, len(val_eps), self.B):
                a, b = self._loss(val_eps[s: s + self.B], backward=False)
                tot, n = tot + a, n + b
        return tot / max(n, 1)

    def train_epoch(self, opt, rng: random.Random, n_t: int, bar, it) -> float:
        """One pass over the training users in a new order, each user's targets drawn anew; its mean token loss."""
        self.gen.train()
        order = list(self.data.train_users)
        rng.shuffle(order)
        tot, n = 0.0, 0
        with self.sh.attached(self.model):
            for s in range(0, len(order), self.B):
                eps = []
                for u in order[s: s + self.B]:
                    items = list(self.data.idx_of[u])
                    rng.shuffle(items)
                    t = min(n_t, len(items) - 1)
                    eps.append((items[t:], items[:t]))
                opt.zero_grad()
                a, b = self._loss(eps, backward=True)
                torch.nn.utils.clip_grad_norm_(self.gen.parameters(), 1.0)  # a few users' loss must not throw it far
                opt.step()
                tot, n = tot + a, n + b
                next(it, None)
                bar.set_postfix(loss=f"{a / max(b, 1):.3f}", refresh=False)
        return tot / max(n, 1)


class _KeepBest:
    """The epoch with the lowest held-out loss (with nothing held out: the last) and its generator's state."""

    def __init__(self, loss: float | None, gen: ShiftGenerator):
        self.loss, self.epoch, self.state, self.bad = loss, 0, {k: v.clone() for k, v in gen.state_dict().items()}, 0

    def update(self, loss: float | None, epoch: int, gen: ShiftGenerator, patience: int) -> bool:
        """Records the epoch; True when `patience` epochs in a row have not beaten the best."""
        if loss is None or loss < self.loss:
            self.loss, self.epoch, self.bad = loss, epoch, 0
            self.state = {k: v.clone() for k, v in gen.state_dict().items()}
            return False
        self.bad += 1
        return self.bad >= patience


def _report(desc: str, data: EpisodeData, gen: ShiftGenerator, best: _KeepBest, val: list, train_losses: list,
            t0: float) -> dict:
    report = {"users_train": len(data.train_users), "users_held_out": len(data.held), "items": len(data.ex),
              "parameters": gen.num_parameters(), "epochs_run": len(train_losses), "best_epoch": best.epoch,
              "held_out_loss_p0": val[0], "held_out_loss": val, "train_loss": train_losses,
              "feature_seconds": round(data.seconds, 2),
              "train_seconds": round(data.seconds + time.perf_counter() - t0, 2)}
    if val[0] is not None and best.epoch == 0:
        log.warning("%s: no epoch beat P0 on the %d held-out stage-1 users (loss %.4f): the generator gives P0, the "
                    "stage-1 shift, to every user; more stage-1 users or other --gen_* settings may help", desc,
                    len(data.held), val[0])
    log.info("%s: %d users (%d held out), best epoch %d, held-out loss %s -> %s, %.1fs", desc, len(data.train_users),
             len(data.held), best.epoch, None if val[0] is None else round(val[0], 4),
             None if best.loss is None else round(best.loss, 4), report["train_seconds"])
    return report


def fit_generator(model, tok, cfg, collective: Shifter, first: int, last: int, per_user: dict[str, list[Example]],
                  desc: str = "shift generator", cache_max_bytes: int = 2 * 1024**3,
                  data: EpisodeData | None = None) -> tuple[ShiftGenerator, dict]:
    """Train a generator on `per_user` (stage-1 users' examples; or on `data` computed from them already). Returns it
    (in eval mode) and its report."""
    c = cfg
    data = data or episode_data(model, tok, cfg, per_user, cache_max_bytes)
    t0 = time.perf_counter()
    idx_of, train_users = data.idx_of, data.train_users
    gen = _new_generator(model, c, collective, data)
    p0 = {k2: v.to(next(model.parameters()).device) for k2, v in collective.user_state(0).items()}
    opt = torch.optim.AdamW(gen.parameters(), lr=c.gen_lr, weight_decay=c.gen_weight_decay)
    n_t = c.gen_targets
    # held-out episodes are fixed: each held-out user's last items are its targets
    val_eps = [(idx_of[u][: -min(n_t, len(idx_of[u]) - 1)], idx_of[u][-min(n_t, len(idx_of[u]) - 1):]) for u in data.held]
    B = c.gen_users_per_step
    episodes = _Episodes(model, gen, collective.spawn(B), p0, data, tok.pad_token_id, first, last, min(c.layers),
                         c.rows_per_pass, B)
    rng = random.Random(f"{c.seed}:generator")
    val = [episodes.held_out_loss(val_eps)]
    best = _KeepBest(val[0], gen)
    train_losses = []
    bar = progress(range(c.gen_epochs * -(-len(train_users) // B)), desc=desc)
    it = iter(bar)
    for epoch in range(1, c.gen_epochs + 1):
        train_losses.append(episodes.train_epoch(opt, rng, n_t, bar, it))
        val.append(episodes.held_out_loss(val_eps))
        log.info("%s: epoch %d, training loss %.4f, held-out loss %s", desc, epoch, train_losses[-1],
                 "n/a" if val[-1] is None else f"{val[-1]:.4f}")
        if best.update(val[-1], epoch, gen, c.gen_patience):
            break
    bar.close()
    gen.load_state_dict(best.state)
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen, _report(desc, data, gen, best, val, train_losses, t0)
