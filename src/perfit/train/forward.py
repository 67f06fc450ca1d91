"""The training forward pass and its loss. Three equivalent paths, the cheapest that applies:

- frozen prefix (last-positions-only shifts with the frozen-prefix cache): only each row's shifted positions and
  target run, from the lowest shifted layer up, against the cached keys/values of its prompt prefix;
- shared prefix (rows open with the same instruction): the prefix runs once per user, the suffixes after it;
- full: every row from the cached lower states (or from the tokens when they are not cached).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..backbone import lm_logits
from ..batching import TokenizedExample, make_batch, shared_prompt_prefix
from ..prefix import cache_kwarg, can_splice, pad_left, rows_cache, skip_lower_layers, splice_layout, splice_shared_prefix
from ..method.shifts import Shifter, ShiftState, position_index
from .caches import FrozenPrefix


def target_loss(model, hidden: torch.Tensor, rows: list[TokenizedExample], starts: list[int], weights: list[float]):
    """Cross-entropy at the target tokens only (`starts[i]`: the column whose output predicts row i's first target
    token). Returns (sum of weight * token loss, per-row sums of token losses [B] (detached), per-row token counts)."""
    device = hidden.device
    rows_i, cols, labels, w = [], [], [], []
    for i, (r, start) in enumerate(zip(rows, starts)):
        n_t = len(r.ids) - r.prompt_len
        rows_i += [i] * n_t
        cols += list(range(start, start + n_t))
        labels += r.ids[r.prompt_len:]
        w += [weights[i]] * n_t
    ri = torch.tensor(rows_i, device=device)
    logits = lm_logits(model, hidden[ri, torch.tensor(cols, device=device)])
    tok_loss = F.cross_entropy(logits, torch.tensor(labels, device=device), reduction="none")
    loss = (tok_loss * torch.tensor(w, device=device, dtype=tok_loss.dtype)).sum()
    row_sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, ri.cpu(), tok_loss.detach().double().cpu())
    return loss, row_sums, [len(r.ids) - r.prompt_len for r in rows]


def _decoder(model, shifter: Shifter, state: ShiftState, low: int | None, **kw) -> torch.Tensor:
    """The decoder's last hidden states under `state`; `low`: bypass the layers below it (inputs are their output)."""
    with shifter.active(state), (skip_lower_layers(model, low) if low is not None else contextlib.nullcontext()):
        return model.get_decoder()(**kw).last_hidden_state


def _forward_frozen_prefix(model, shifter: Shifter, rows: list[TokenizedExample], pres: list[FrozenPrefix], low: int,
                           last: int):
    device = next(model.parameters()).device
    lay = splice_layout([p.P for p in pres], [len(r.ids) - p.P for r, p in zip(rows, pres)])
    like = pres[0].suffix_states.to(device)
    cache = rows_cache(model, [p.keys for p in pres], [p.values for p in pres], low, like)
    sidx, svalid = position_index([r.prompt_len for r in rows], [o - p.P for o, p in zip(lay.offsets, pres)], 0, last)
    state = ShiftState(sidx.to(device), svalid.to(device), torch.tensor([r.module for r in rows], device=device), lay.S)
    hidden = _decoder(model, shifter, state, low, inputs_embeds=pad_left([p.suffix_states for p in pres], lay.S, 0, like),
                      attention_mask=lay.mask.to(device), position_ids=lay.position_ids.to(device), use_cache=True,
                      **{cache_kwarg(model.get_decoder()): cache})
    return hidden, [o + r.prompt_len - 1 - p.P for o, r, p in zip(lay.offsets, rows, pres)]


def _forward_shared_prefix(model, shifter: Shifter, rows: list[TokenizedExample], Lp: int, pad_id: int, first: int,
                           last: int, lower: list[torch.Tensor] | None, low: int):
    device = next(model.parameters()).device
    sp = splice_shared_prefix(model, rows[0].ids[:Lp], [r.prompt_len for r in rows], [len(r.ids) - Lp for r in rows],
                              [r.module for r in rows], shifter, first, last,
                              lower_h=None if lower is None else lower[0][:Lp])
    lay, state, cache = sp.layout, sp.state, sp.cache
    if lower is not None:
        inputs = {"inputs_embeds": pad_left([h[Lp:] for h in lower], lay.S, 0, lower[0].to(device))}
    else:
        inputs = {"input_ids": pad_left([r.ids[Lp:] for r in rows], lay.S, pad_id).to(device)}
    hidden = _decoder(model, shifter, state, low if lower is not None else None, **inputs,
                      attention_mask=lay.mask.to(device), position_ids=lay.position_ids.to(device), use_cache=True,
                      **{cache_kwarg(model.get_decoder()): cache})
    return hidden, [o + r.prompt_len - 1 - Lp for o, r in zip(lay.offsets, rows)]


def _forward_full(model, shifter: Shifter, rows: list[TokenizedExample], pad_id: int, first: int, last: int,
                  lower: list[torch.Tensor] | None, low: int):
    device = next(model.parameters()).device
    b = make_batch([r.ids for r in rows], [r.prompt_len for r in rows], [r.module for r in rows], pad_id, first, last).to(device)
    T = b.input_ids.shape[1]
    state = ShiftState(b.shift_index, b.shift_valid, b.users, T)
    if lower is not None:
        inputs = {"inputs_embeds": pad_left(lower, T, 0, lower[0].to(device))}
    else:
        inputs = {"input_ids": b.input_ids}
    hidden = _decoder(model, shifter, state, low if lower is not None else None, **inputs,
                      attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
    return hidden, [off + r.prompt_len - 1 for r, off in zip(rows, b.offsets)]


def forward_loss(model, shifter: Shifter, rows: list[TokenizedExample], weights: list[float], pad_id: int,
                 first: int, last: int, lower: list[torch.Tensor] | None, low_layer: int, share_prefix: bool = True,
                 frozen: list[FrozenPrefix] | None = None):
    """Sum over rows of weight * (sum of the row's target-token losses), each row shifted by its own personal module
    (`row.module`) and the collective one. Returns (loss, per-row token-loss sums, per-row token counts).
    `lower`: the rows' cached states entering layer `low_layer`; `frozen`: their cached prefixes."""
    if frozen is not None:
        hidden, starts = _forward_frozen_prefix(model, shifter, rows, frozen, low_layer, last)
    else:
        spliceable = share_prefix and can_splice(model, max(len(r.ids) for r in rows))  # spliced: the longest row's columns
        Lp = shared_prompt_prefix([r.ids[: r.prompt_len] for r in rows], first, last) if spliceable else 0
        if Lp:
            hidden, starts = _forward_shared_prefix(model, shifter, rows, Lp, pad_id, first, last, lower, low_layer)
        else:
            hidden, starts = _forward_full(model, shifter, rows, pad_id, first, last, lower, low_layer)
    return target_loss(model, hidden, rows, starts, weights)


@torch.no_grad()
def mean_loss(model, shifter: Shifter, rows: list[TokenizedExample], pad_id: int, first: int, last: int,
              max_rows: int = 32) -> float:
    """Mean target-token loss of `rows` under the shifter's current state (each row with its own module)."""
    total, n = 0.0, 0
    rows = sorted(rows, key=lambda r: len(r.ids))  # passes of similar lengths: little padding
    for s in range(0, len(rows), max_rows):
        part = rows[s: s + max_rows]
        _, sums, toks = forward_loss(model, shifter, part, [0.0] * len(part), pad_id, first, last, None, min(shifter.layers))
        total, n = total + float(sums.sum()), n + sum(toks)
    return total / max(n, 1)
