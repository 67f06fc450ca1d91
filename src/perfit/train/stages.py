"""The two stages on a frozen model: stage 1 (the collective shift and P0 on all other users' examples, checked for
having learned at all) and one group of users' personal shifts trained together (stage 2). PerFitModel decides what
to train, resumes, stores and deals groups to ranks; this module only trains."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

from .. import dist
from ..batching import tokenize_examples
from ..method.config import PerFitConfig
from ..prompts import Example
from ..method.shifts import Shifter
from ..store import history_digest
from .forward import mean_loss
from .loop import TrainState, TrainStats, train_shifts

log = logging.getLogger("perfit")
PROBE_EXAMPLES = 64
MIN_FALL = 0.05  # stage 1 "learned" when the loss on its fixed probe items fell by at least this fraction


def stage1_learning(before: float | None, after: float | None, n: int, cfg) -> dict:
    """Whether stage 1 learned: its loss on `n` fixed training items before and after training, and, when it fell by
    less than MIN_FALL, a message saying so and what to try."""
    out = {"probe_examples": n, "loss_before": before, "loss_after": after, "min_fall": MIN_FALL}
    if before is None or after is None or cfg.stage1_epochs == 0:
        return out | {"relative_fall": None, "learned": True, "message": ""}
    fall = 1.0 - after / before if before > 0 else 0.0
    learned = fall >= MIN_FALL
    msg = "" if learned else (
        f"stage 1 learned little: its loss on {n} of its training items went from {before:.4f} to {after:.4f} "
        f"({-100 * fall:+.1f} %, less than a {100 * MIN_FALL:.0f} % fall), so the personal shifts start from a collective "
        f"shift that does next to nothing. Try a larger --lr (now {cfg.lr:g}) or --stage1_epochs (now "
        f"{cfg.stage1_epochs}), --shift_init zero, or other layers (--intervene_layer {cfg.intervene_layer}; fractions "
        f"of depth such as 0.7;0.85 carry across models)")
    return out | {"relative_fall": round(fall, 4), "learned": learned, "message": msg}


def fit_collective(model, tok, cfg, hidden_size: int, first: int, last: int, examples: list[Example], desc: str,
                   resume: TrainState | None, on_epoch: Callable[[TrainState], None] | None,
                   train_kw: dict) -> tuple[Shifter, TrainStats, dict]:
    """Stage 1 on `examples` (module 0): returns the trained shifter, its stats and whether it learned."""
    c = cfg
    # shifts are float32 (QR in bf16 is unreliable), float64 in a float64 model (the exactness checks)
    device = next(model.parameters()).device
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    sh = Shifter(hidden_size, c.layers, c.low_rank_dimension, c.user_low_rank_dimension, 1, c.seed,
                 c.shift_init).to(device, dtype)
    ex = tokenize_examples(tok, examples, c.max_length)
    for e in ex:
        e.module, e.key = 0, "stage1"
    probe = ex[:: max(1, len(ex) // PROBE_EXAMPLES)][:PROBE_EXAMPLES]  # fixed items, scored before and after
    with sh.attached(model):
        before = mean_loss(model, sh, probe, tok.pad_token_id, first, last) if probe else None
        stats = train_shifts(model, sh, ex, epochs=c.stage1_epochs, batch_size=c.batch_size, lr=c.lr,
                             train_collective=True, pad_id=tok.pad_token_id, first=first, last=last, seed=c.seed,
                             desc=desc, resume=resume, on_epoch=on_epoch, data_parallel=dist.enabled(), **train_kw)
        after = mean_loss(model, sh, probe, tok.pad_token_id, first, last) if probe else None
    learning = stage1_learning(before, after, len(probe), c)
    log.info("%s: %d examples, %d steps, loss by epoch %s, %.1fs", desc, len(ex), stats.steps,
             [round(x, 4) for x in stats.epoch_losses], stats.seconds)
    if not learning["learned"]:
        log.warning("%s", learning["message"])
    return sh, stats, learning


def train_group(model, tok, cfg, collective: Shifter, first: int, last: int, examples: dict[str, list[Example]],
                items: dict[str, int], desc: str, train_kw: dict, start: dict[str, dict] | None = None):
    """One group of users trained together from P0, or from `start` ({user: tensors}, e.g. generated shifts)
    (`examples`: each user's own; `items`: how many history items it had). Returns ({user: tensors}, {user: report})."""
    c = cfg
    group = list(examples)
    module_of = {u: k for k, u in enumerate(group)}
    # early stopping: a user's last items validate the rest (users with too few items train on all)
    n_val = {u: c.early_stopping if 0 < c.early_stopping < len(examples[u]) else 0 for u in group}
    ex = tokenize_examples(tok, [e for u in group for e in examples[u][: len(examples[u]) - n_val[u]]], c.max_length,
                           module_of)
    val = tokenize_examples(tok, [e for u in group for e in examples[u][len(examples[u]) - n_val[u]:]], c.max_length,
                            module_of)
    sh = collective.spawn(len(group))
    for u in start or {}:
        sh.load_user_state(module_of[u], start[u])
    with sh.attached(model):
        stats = train_shifts(model, sh, ex, epochs=c.max_epoch, batch_size=c.batch_size, lr=c.user_lr,
                             train_collective=False, pad_id=tok.pad_token_id, first=first, last=last, seed=c.seed,
                             desc=desc, val_examples=val or None, patience=c.patience, **train_kw)
    now = round(time.time(), 3)
    info = {}
    for u in group:
        losses = stats.user_epoch_losses.get(module_of[u], [])
        info[u] = {"items": items[u], "examples": len(examples[u]), "history_digest": history_digest(examples[u]),
                   "epoch_losses": losses, "final_loss": losses[-1] if losses else None,
                   "train_seconds": round(stats.seconds / len(group), 3), "trained_at": now, "rank": dist.rank()}
        if module_of[u] in stats.user_best_epoch:
            info[u] |= {"best_epoch": stats.user_best_epoch[module_of[u]], "val_losses": stats.user_val_losses[module_of[u]]}
    log.info("%s: trained %d users (loss by epoch %s, %.1fs)", desc, len(group), [round(x, 4) for x in stats.epoch_losses],
             stats.seconds)
    return {u: sh.user_state(module_of[u]) for u in group}, info


def stage1_meta(cfg, run_fields: dict, key: str, fingerprints: dict, info, stats: TrainStats, learning: dict,
                examples: int) -> dict:
    """What a stage-1 checkpoint says about itself (its config.json)."""
    c = cfg
    return {"stage1_key": key, "fingerprints": fingerprints, "run_config": run_fields,
            "perfit_config": PerFitConfig.from_run(c, info.hidden_size).to_dict(),
            "model": dataclasses.asdict(info), "learning": learning,
            "examples": examples, "train_seconds": stats.seconds, "stats": dataclasses.asdict(stats)}
