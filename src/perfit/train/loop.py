"""One training loop for both stages.

Each personal module trains on its own examples with its own data order (seeded by its user id); step k of
the loop is step k of every user still training, so many users train in one batch while each user's
update is exactly what training it alone would give (loss normalised per user, Adam state and step counts
per user, users with no data at a step left untouched). The frozen states entering the lowest shifted
layer are computed once and reused across epochs; logits are computed at target positions only.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from ..progress import progress

from ..backbone import decoder_layers, has_sliding_window, text_config
from ..shifts import Shifter, ShiftState, lower_states, skip_lower_layers
from .batching import TokenizedExample, make_batch, shared_prompt_prefix, unshifted_prefix_len

log = logging.getLogger("perfit")


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

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


@dataclass
class TrainStats:
    steps: int = 0
    epochs: int = 0
    examples_seen: int = 0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    epoch_losses: list = field(default_factory=list)  # mean token loss per epoch-sized slice of steps
    seconds: float = 0.0
    cached_lower_layers: bool = False
    cached_on_disk: bool = False  # the frozen-state cache is memory-mapped on disk
    cached_frozen_prefix: bool = False


def _schedule(examples: list[TokenizedExample], epochs: int, batch_size: int, seed: int) -> list[list[list[int]]]:
    """steps[k] = the list of per-user batches (example indices) of global step k."""
    by_user: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_user.setdefault(ex.module, []).append(i)
    per_user: list[list[list[int]]] = []
    for u, idx in sorted(by_user.items()):
        rng = random.Random(f"{seed}:{examples[idx[0]].key}")
        steps = []
        for _ in range(epochs):
            order = idx[:]
            rng.shuffle(order)
            steps += [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        per_user.append(steps)
    n = max((len(s) for s in per_user), default=0)
    return [[s[k] for s in per_user if k < len(s)] for k in range(n)]


def _logits_at(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def shared_prefix_len(rows: list[TokenizedExample], first: int, last: int, min_len: int = 8) -> int:
    """The prompt prefix all rows share and can run once per user (see `shared_prompt_prefix`)."""
    return shared_prompt_prefix([r.ids[: r.prompt_len] for r in rows], first, last, min_len)


def _kv_shape(model) -> tuple[int, int]:
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    return getattr(cfg, "num_key_value_heads", None) or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def _forward_shared_prefix(model, shifter: Shifter, rows: list[TokenizedExample], Lp: int, pad_id: int, first: int,
                           last: int, lower: list[torch.Tensor] | None, low_layer: int, use_personal: bool):
    """Run the shared prefix once per user in the chunk, then every row's suffix against its user's prefix
    keys/values (gradients flow into the prefix through them). Returns the suffix hidden states [B, S, d]
    and the suffix column of each row's first target prediction."""
    from transformers import DynamicCache

    from ..predict import cache_kwarg

    device = next(model.parameters()).device
    users = sorted({r.module for r in rows})
    g_of = {u: i for i, u in enumerate(users)}
    G, B = len(users), len(rows)
    nf = min(first, rows[0].prompt_len // 2)
    kw = cache_kwarg(model.get_decoder())
    cache = DynamicCache(config=model.config)
    pidx = torch.arange(nf, dtype=torch.long).expand(G, nf).to(device)
    pstate = ShiftState(pidx, torch.ones(G, nf, dtype=torch.bool, device=device),
                        torch.tensor(users, device=device) if use_personal else None, Lp)
    ppos = torch.arange(Lp, device=device).expand(G, Lp)
    pmask = torch.ones(G, Lp, dtype=torch.long, device=device)
    with shifter.active(pstate):
        if lower is not None:
            with skip_lower_layers(model, low_layer):
                model.get_decoder()(inputs_embeds=lower[0][:Lp].to(device).expand(G, -1, -1), attention_mask=pmask,
                                    position_ids=ppos, use_cache=True, **{kw: cache})
            kvh, hd = _kv_shape(model)
            z = torch.zeros(G, kvh, Lp, hd, dtype=lower[0].dtype, device=device)
            for i in range(low_layer):  # skipped layers hold placeholders so the cache reports the right length
                cache.update(z, z, i)
        else:
            model.get_decoder()(input_ids=torch.tensor([rows[0].ids[:Lp]] * G, device=device), attention_mask=pmask,
                                position_ids=ppos, use_cache=True, **{kw: cache})
    cache.reorder_cache(torch.tensor([g_of[r.module] for r in rows], device=device))
    S = max(len(r.ids) - Lp for r in rows)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    smask = torch.zeros(B, S, dtype=torch.long)
    sidx = torch.zeros(B, max(last, 1), dtype=torch.long)
    svalid = torch.zeros(B, max(last, 1), dtype=torch.bool)
    for b, r in enumerate(rows):
        suf = r.ids[Lp:]
        ids[b, : len(suf)] = torch.tensor(suf)
        smask[b, : len(suf)] = 1
        nl = min(last, r.prompt_len // 2)
        if nl:
            sidx[b, :nl] = torch.arange(r.prompt_len - nl, r.prompt_len) - Lp
            svalid[b, :nl] = True
    mask = torch.cat([torch.ones(B, Lp, dtype=torch.long), smask], 1).to(device)
    pos = (Lp + torch.arange(S)).expand(B, S).to(device)
    state = ShiftState(sidx.to(device), svalid.to(device),
                       torch.tensor([r.module for r in rows], device=device) if use_personal else None, S)
    with shifter.active(state):
        if lower is not None:
            h = torch.zeros(B, S, lower[0].shape[-1], dtype=lower[0].dtype, device=device)
            for b, r in enumerate(rows):
                h[b, : len(r.ids) - Lp] = lower[b][Lp:].to(device)
            with skip_lower_layers(model, low_layer):
                hidden = model.get_decoder()(inputs_embeds=h, attention_mask=mask, position_ids=pos, use_cache=True,
                                             **{kw: cache}).last_hidden_state
        else:
            hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask, position_ids=pos, use_cache=True,
                                         **{kw: cache}).last_hidden_state
    return hidden, [r.prompt_len - 1 - Lp for r in rows]


@dataclass
class FrozenPrefix:
    """What one example needs when only its last prompt positions are shifted (no `f` group): the keys/values of the
    unshifted prompt prefix at every layer from the lowest shifted one on, and the states entering that layer for
    the rest (the shifted positions and the target). Causal attention keeps all of it fixed during training."""
    P: int  # prefix tokens
    keys: list[torch.Tensor]  # per layer >= low: [kv_heads, P, head_dim]
    values: list[torch.Tensor]
    suffix_states: torch.Tensor  # [len - P, hidden]


def frozen_prefix_len(ex: TokenizedExample, last: int) -> int:
    return unshifted_prefix_len(ex.prompt_len, last)


@torch.no_grad()
def compute_frozen_prefix(model, examples: list[TokenizedExample], low: int, last: int, pad_id: int, max_bytes: int,
                          chunk: int = 16, desc: str = "caching frozen prefixes") -> list[FrozenPrefix] | None:
    """One no-grad pass over every example; None when the cache would exceed `max_bytes`."""
    from transformers import DynamicCache

    from ..predict import cache_kwarg

    if not examples or has_sliding_window(model):
        return None
    p = next(model.parameters())
    n_layers = len(decoder_layers(model))
    kvh, hd = _kv_shape(model)
    d = text_config(model).hidden_size
    need = sum(frozen_prefix_len(e, last) * (n_layers - low) * 2 * kvh * hd + (len(e.ids) - frozen_prefix_len(e, last)) * d
               for e in examples) * p.element_size()
    if need > max_bytes:
        log.info("frozen-prefix cache would take %.1f MB > bound %.1f MB: not used", need / 2**20, max_bytes / 2**20)
        return None
    kw = cache_kwarg(model.get_decoder())
    out: list[FrozenPrefix | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for s in progress(range(0, len(order), chunk), desc=desc, leave=False):
        idx = order[s: s + chunk]
        b = make_batch([examples[i].ids for i in idx], [examples[i].prompt_len for i in idx], [0] * len(idx), pad_id, 1, 0).to(p.device)
        captured = {}

        def pre(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]

        handle = decoder_layers(model)[low].register_forward_pre_hook(pre, with_kwargs=True)
        cache = DynamicCache(config=model.config)
        try:
            model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                use_cache=True, **{kw: cache})
        finally:
            handle.remove()
        for j, i in enumerate(idx):
            off, P = b.offsets[j], frozen_prefix_len(examples[i], last)
            out[i] = FrozenPrefix(P, [cache.layers[l].keys[j, :, off: off + P].clone() for l in range(low, n_layers)],
                                  [cache.layers[l].values[j, :, off: off + P].clone() for l in range(low, n_layers)],
                                  captured["h"][j, off + P:].clone())
    return out  # type: ignore[return-value]


def _forward_frozen_prefix(model, shifter: Shifter, rows: list[TokenizedExample], pres: list[FrozenPrefix], low: int,
                           last: int, use_personal: bool):
    """Run only each row's suffix (shifted positions + target) through the layers from `low` on, attending to its
    cached prefix keys/values (left-padded to a common length). Returns hidden [B, S, d] and each row's start."""
    from transformers import DynamicCache

    from ..predict import cache_kwarg

    device = next(model.parameters()).device
    B, n_layers = len(rows), len(decoder_layers(model))
    kvh, hd = _kv_shape(model)
    Pm = max(p.P for p in pres)
    S = max(len(r.ids) - p.P for r, p in zip(rows, pres))
    dt = pres[0].suffix_states.dtype
    cache = DynamicCache(config=model.config)
    zero = torch.zeros(B, kvh, Pm, hd, dtype=dt, device=device)
    for l in range(n_layers):
        if l < low:  # bypassed layers: placeholders so the cache reports the prefix length
            cache.update(zero, zero, l)
            continue
        k, v = torch.zeros_like(zero), torch.zeros_like(zero)
        for b, p in enumerate(pres):
            k[b, :, Pm - p.P:] = p.keys[l - low].to(device)
            v[b, :, Pm - p.P:] = p.values[l - low].to(device)
        cache.update(k, v, l)
    mask = torch.zeros(B, Pm + S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    h = torch.zeros(B, S, pres[0].suffix_states.shape[-1], dtype=dt, device=device)
    sidx = torch.zeros(B, max(last, 1), dtype=torch.long)
    svalid = torch.zeros(B, max(last, 1), dtype=torch.bool)
    for b, (r, p) in enumerate(zip(rows, pres)):
        n = len(r.ids) - p.P
        mask[b, Pm - p.P: Pm + n] = 1  # prefix left-padded, suffix right-padded (causal: real tokens never see it)
        pos[b] = p.P + torch.arange(S)
        h[b, :n] = p.suffix_states.to(device)
        nl = min(last, r.prompt_len // 2)
        if nl:
            sidx[b, :nl] = torch.arange(r.prompt_len - nl, r.prompt_len) - p.P
            svalid[b, :nl] = True
    state = ShiftState(sidx.to(device), svalid.to(device),
                       torch.tensor([r.module for r in rows], device=device) if use_personal else None, S)
    with shifter.active(state), skip_lower_layers(model, low):
        hidden = model.get_decoder()(inputs_embeds=h, attention_mask=mask.to(device), position_ids=pos.to(device),
                                     use_cache=True, **{cache_kwarg(model.get_decoder()): cache}).last_hidden_state
    return hidden, [r.prompt_len - 1 - p.P for r, p in zip(rows, pres)]


def forward_loss(model, shifter: Shifter, rows: list[TokenizedExample], weights: list[float], pad_id: int,
                 first: int, last: int, lower: list[torch.Tensor] | None, low_layer: int,
                 use_personal: bool = True, share_prefix: bool = True,
                 frozen: list[FrozenPrefix] | None = None) -> tuple[torch.Tensor, float, int]:
    """Sum over rows of weight * (sum of the row's target-token losses). Returns (loss, raw token-loss sum, tokens).
    `frozen`: the rows' cached prefixes (only the suffixes then run, from layer `low_layer` on)."""
    device = next(model.parameters()).device
    if frozen is not None:
        hidden, starts = _forward_frozen_prefix(model, shifter, rows, frozen, low_layer, last, use_personal)
        return target_loss(model, hidden, rows, starts, weights)
    Lp = shared_prefix_len(rows, first, last) if share_prefix else 0
    if Lp:
        hidden, starts = _forward_shared_prefix(model, shifter, rows, Lp, pad_id, first, last, lower, low_layer, use_personal)
        return target_loss(model, hidden, rows, starts, weights)
    b = make_batch([r.ids for r in rows], [r.prompt_len for r in rows], [r.module for r in rows], pad_id, first, last).to(device)
    T = b.input_ids.shape[1]
    state = ShiftState(b.shift_index, b.shift_valid, b.users if use_personal else None, T)
    with shifter.active(state):
        if lower is not None:
            h0 = torch.zeros(len(rows), T, lower[0].shape[-1], dtype=lower[0].dtype, device=device)
            for i, (h, off) in enumerate(zip(lower, b.offsets)):
                h0[i, off:] = h.to(device)
            with skip_lower_layers(model, low_layer):
                hidden = model.get_decoder()(inputs_embeds=h0, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                             use_cache=False).last_hidden_state
        else:
            hidden = model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                         use_cache=False).last_hidden_state
    # the position whose output predicts the first target token
    return target_loss(model, hidden, rows, [off + r.prompt_len - 1 for r, off in zip(rows, b.offsets)], weights)


def target_loss(model, hidden: torch.Tensor, rows: list[TokenizedExample], starts: list[int], weights: list[float]):
    device = hidden.device
    rows_i, cols, labels, w = [], [], [], []
    for i, (r, start) in enumerate(zip(rows, starts)):
        n_t = len(r.ids) - r.prompt_len
        rows_i += [i] * n_t
        cols += list(range(start, start + n_t))
        labels += r.ids[r.prompt_len:]
        w += [weights[i]] * n_t
    logits = _logits_at(model, hidden[torch.tensor(rows_i, device=device), torch.tensor(cols, device=device)])
    tok_loss = F.cross_entropy(logits, torch.tensor(labels, device=device), reduction="none")
    loss = (tok_loss * torch.tensor(w, device=device)).sum()
    return loss, float(tok_loss.detach().sum()), len(labels)


def _state_buffer(numel: int, dtype: torch.dtype, max_bytes: int, disk_dir: str, disk_max_bytes: int,
                  what: str) -> torch.Tensor | None:
    """A flat buffer for cached states: in memory within `max_bytes`, else a memory-mapped file in `disk_dir`
    within `disk_max_bytes` (unlinked at once: the mapping keeps it alive and nothing is left behind), else None."""
    need = numel * torch.empty(0, dtype=dtype).element_size()
    if need <= max_bytes:
        return torch.empty(numel, dtype=dtype)
    if disk_dir and need <= disk_max_bytes:
        os.makedirs(disk_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="perfit-states-", suffix=".bin", dir=disk_dir)
        try:
            os.ftruncate(fd, need)
            buf = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.close(fd)
            os.unlink(path)
        log.info("%s: %.1f MB > memory bound %.1f MB: memory-mapped on disk in %s", what, need / 2**20, max_bytes / 2**20, disk_dir)
        return buf
    log.info("%s would take %.1f MB > bounds (memory %.1f MB, disk %.1f MB): recomputing each epoch", what, need / 2**20,
             max_bytes / 2**20, disk_max_bytes / 2**20 if disk_dir else 0.0)
    return None


def compute_lower_cache(model, examples: list[TokenizedExample], layer: int, pad_id: int, max_bytes: int,
                        chunk: int = 16, desc: str = "caching frozen states", disk_dir: str = "",
                        disk_max_bytes: int = 0) -> list[torch.Tensor] | None:
    """Per-example hidden states entering `layer` (views into one buffer, in memory or memory-mapped on disk),
    or None when they exceed both bounds."""
    if layer == 0 or not examples:
        return None
    p = next(model.parameters())
    d = text_config(model).hidden_size
    starts = [0]
    for e in examples:
        starts.append(starts[-1] + len(e.ids) * d)
    buf = _state_buffer(starts[-1], p.dtype, max_bytes, disk_dir, disk_max_bytes, "frozen-state cache")
    if buf is None:
        return None
    cache = [buf[starts[i]: starts[i + 1]].view(len(e.ids), d) for i, e in enumerate(examples)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for s in progress(range(0, len(order), chunk), desc=desc, leave=False):
        idx = order[s: s + chunk]
        b = make_batch([examples[i].ids for i in idx], [examples[i].prompt_len for i in idx], [0] * len(idx), pad_id, 1, 0).to(p.device)
        h = lower_states(model, b.input_ids, b.attention_mask, b.position_ids, layer)
        for j, i in enumerate(idx):
            cache[i].copy_(h[j, b.offsets[j]:])
    return cache


def _chunks(examples: list[TokenizedExample], rows: list[int], max_rows: int, by_user: bool) -> list[list[int]]:
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
        out[-1] += mine  # a user's rows never exceed batch_size, so this stays near max_rows
    return out


def train_shifts(model, shifter: Shifter, examples: list[TokenizedExample], *, epochs: int, batch_size: int, lr: float,
                 train_collective: bool, pad_id: int, first: int, last: int, seed: int = 0, max_rows: int = 32,
                 cache_max_bytes: int = 2 * 1024**3, share_prefix: bool = True, frozen_prefix: bool = True,
                 disk_cache_dir: str = "", disk_cache_max_bytes: int = 0, desc: str = "training") -> TrainStats:
    """Train the personal modules (and the collective one if `train_collective`) on `examples`, each
    example updating the personal module `example.module`. Frozen states are cached in memory within
    `cache_max_bytes`, else memory-mapped under `disk_cache_dir` within `disk_cache_max_bytes`, else recomputed."""
    stats = TrainStats()
    t0 = time.perf_counter()
    if not examples:
        return stats
    for p in shifter.collective.parameters():
        p.requires_grad_(train_collective)
    params = list(shifter.personal.parameters()) + (list(shifter.collective.parameters()) if train_collective else [])
    for p in shifter.personal.parameters():
        p.requires_grad_(True)
    opt = MaskedAdamW(params, lr)
    low = min(shifter.layers)
    # with no `f` group, everything before the last shifted positions is frozen: cache its keys/values (when they fit)
    frozen = compute_frozen_prefix(model, examples, low, last, pad_id, cache_max_bytes) if frozen_prefix and first == 0 else None
    lower = None if frozen is not None else compute_lower_cache(model, examples, low, pad_id, cache_max_bytes,
                                                                disk_dir=disk_cache_dir, disk_max_bytes=disk_cache_max_bytes)
    share_prefix = share_prefix and frozen is None
    stats.cached_lower_layers = lower is not None or frozen is not None
    stats.cached_on_disk = lower is not None and lower[0].untyped_storage().filename is not None
    stats.cached_frozen_prefix = frozen is not None
    schedule = _schedule(examples, epochs, batch_size, seed)
    K = shifter.num_users
    bar = progress(schedule, desc=desc)
    per_epoch = max(1, -(-len(schedule) // epochs))
    acc, acc_n = 0.0, 0
    for k, step in enumerate(bar):
        # each user's loss is the mean over its own target tokens in this step
        rows = [i for user_batch in step for i in user_batch]
        tokens_of: dict[int, int] = {}
        for i in rows:
            ex = examples[i]
            tokens_of[ex.module] = tokens_of.get(ex.module, 0) + len(ex.ids) - ex.prompt_len
        opt.zero_grad()
        total, ntok = 0.0, 0
        for part in _chunks(examples, rows, max_rows, share_prefix):
            chunk = [examples[i] for i in part]
            w = [1.0 / tokens_of[ex.module] for ex in chunk]
            loss, raw, n = forward_loss(model, shifter, chunk, w, pad_id, first, last,
                                        None if lower is None else [lower[i] for i in part], low, share_prefix=share_prefix,
                                        frozen=None if frozen is None else [frozen[i] for i in part])
            loss.backward()
            total, ntok = total + raw, ntok + n
        active = torch.zeros(K, dtype=torch.bool)
        active[list(tokens_of)] = True
        opt.step(active)
        stats.steps += 1
        stats.examples_seen += len(rows)
        mean = total / max(ntok, 1)
        if stats.steps == 1:
            stats.first_loss = mean
        stats.last_loss = mean
        acc, acc_n = acc + total, acc_n + ntok
        if (k + 1) % per_epoch == 0 or k + 1 == len(schedule):
            stats.epoch_losses.append(round(acc / max(acc_n, 1), 4))
            acc, acc_n = 0.0, 0
        bar.set_postfix(loss=f"{mean:.3f}", refresh=False)
    for p in shifter.parameters():
        p.requires_grad_(False)
    stats.epochs = epochs
    stats.seconds = time.perf_counter() - t0
    return stats
