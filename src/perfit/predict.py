"""Greedy generation for a batch of queries from many users, each row with its own personal shift.

Rows are left-padded; shifts act on the prompt positions in the prefill pass only, never on generated
tokens. Decoding stops at EOS or at the first newline of every row."""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from .progress import progress

from .prompts import clean_prediction
from .shifts import Shifter, ShiftState
from .train.batching import make_batch


@lru_cache(maxsize=8)
def _newline_ids(tok) -> frozenset[int]:
    return frozenset(i for i in range(len(tok)) if "\n" in tok.decode([i]))


@lru_cache(maxsize=8)
def _blank_ids(tok) -> frozenset[int]:
    return frozenset(i for i in range(len(tok)) if not tok.decode([i]).strip())


def cache_kwarg(model) -> str:
    """The name under which this transformers version takes a KV cache ('cache' from 5.x on)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def greedy_generate(model, tok, prompts: list[list[int]], users: list[int] | None = None, shifter: Shifter | None = None,
                    use_collective: bool = True, first: int = 0, last: int = 0, max_new_tokens: int = 16,
                    batch_size: int = 32, desc: str = "generating", stop_early: bool = True) -> list[str]:
    """Returns the cleaned generation of each prompt (token ids), in input order. `users[i]` is the personal
    module of prompt i (None: no personal shift); `shifter` None: the bare model. `stop_early=False` always
    generates max_new_tokens tokens (for like-for-like throughput measurements)."""
    device = next(model.parameters()).device
    eos = tok.eos_token_id
    newline = set(_newline_ids(tok)) if stop_early else set()
    blank = _blank_ids(tok)
    kw = cache_kwarg(model)
    # only the last position's logits are needed
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for s in progress(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[s: s + batch_size]
        b = make_batch([prompts[i] for i in idx], [len(prompts[i]) for i in idx],
                       [users[i] if users is not None else 0 for i in idx], tok.pad_token_id, max(first, 0), max(last, 0)).to(device)
        mask, pos = b.attention_mask, b.position_ids
        state = None
        if shifter is not None:
            state = ShiftState(b.shift_index, b.shift_valid, b.users if users is not None else None,
                               b.input_ids.shape[1], use_collective)
        if shifter is not None:
            with shifter.active(state):
                res = model(input_ids=b.input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        else:
            res = model(input_ids=b.input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        gen = [[] for _ in idx]
        done = torch.zeros(len(idx), dtype=torch.bool)
        started = [False] * len(idx)  # a newline ends the answer only once some text was produced
        nxt = res.logits[:, -1].argmax(-1)
        for step in range(max_new_tokens):
            for j, t in enumerate(nxt.tolist()):
                if done[j]:
                    continue
                if stop_early and t == eos:
                    done[j] = True
                    continue
                gen[j].append(t)
                if t in newline and started[j]:
                    done[j] = True
                started[j] = started[j] or t not in blank
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(len(idx), 1)], dim=1)
            pos = pos[:, -1:] + 1
            res = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, use_cache=True, **keep, **{kw: cache})
            cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
            nxt = res.logits[:, -1].argmax(-1)
        for j, i in enumerate(idx):
            out[i] = clean_prediction(tok.decode(gen[j], skip_special_tokens=True))
    return out
