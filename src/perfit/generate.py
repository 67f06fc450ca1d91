"""Greedy generation for a batch of queries from many users, each row with its own personal shift.

Rows are left-padded; shifts act on the prompt positions in the prefill pass only, never on generated
tokens. Decoding stops at EOS or at the first newline of every row (once some text was produced)."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

from .batching import make_batch, shared_prompt_prefix
from .prefix import cache_kwarg, can_splice, splice_shared_prefix
from .progress import progress
from .prompts import clean_prediction
from .shifts import Shifter, ShiftState


@lru_cache(maxsize=8)
def _newline_ids(tok) -> frozenset[int]:
    return frozenset(i for i in range(len(tok)) if "\n" in tok.decode([i]))


@lru_cache(maxsize=8)
def _blank_ids(tok) -> frozenset[int]:
    return frozenset(i for i in range(len(tok)) if not tok.decode([i]).strip())


def _prefill(model, prompts: list[list[int]], users: list[int] | None, shifter: Shifter | None, use_collective: bool,
             first: int, last: int, pad_id: int, share_prefix: bool, keep: dict):
    """The prefill pass of one batch. Returns (output, attention mask, position ids of the last column).

    With a shared prefix it runs once per distinct user (once in all when no shift touches it), its keys/values
    are copied to every row, and the rows' own suffixes follow, left-padded after the prefix: the mask hides
    the gap and positions continue from the prefix, so each row sees exactly its own prompt."""
    device = next(model.parameters()).device
    B = len(prompts)
    Lp = shared_prompt_prefix(prompts, first, last) if share_prefix else 0
    Lp = Lp if Lp and can_splice(model) else 0
    if not Lp:
        b = make_batch(prompts, [len(p) for p in prompts], users if users is not None else [0] * B, pad_id, first, last).to(device)
        state = None if shifter is None else ShiftState(b.shift_index, b.shift_valid, b.users if users is not None else None,
                                                         b.input_ids.shape[1], use_collective)
        with (shifter.active(state) if shifter is not None else contextlib.nullcontext()):
            res = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=True, **keep)
        return res, b.attention_mask, b.position_ids[:, -1:]
    sufs = [p[Lp:] for p in prompts]
    sp = splice_shared_prefix(model, prompts[0][:Lp], [len(p) for p in prompts], [len(s) for s in sufs], users, shifter,
                              first, last, use_collective)
    b = make_batch(sufs, [len(s) for s in sufs], users if users is not None else [0] * B, pad_id, 0, 0)
    mask, pos = sp.layout.mask.to(device), sp.layout.position_ids.to(device)
    with (shifter.active(sp.state) if sp.state is not None else contextlib.nullcontext()):
        res = model(input_ids=b.input_ids.to(device), attention_mask=mask, position_ids=pos, use_cache=True, **keep,
                    **{cache_kwarg(model): sp.cache})
    return res, mask, pos[:, -1:]


@dataclass
class Completion:
    """One request to `PerFitModel.complete`."""
    user_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    task: bool = False  # True: a task answer (ends at its first line, cleaned); False: a raw completion (EOS ends it)
    on_token: Callable[[int], bool | None] | None = None  # each token as generated; True ends the answer there


@dataclass
class CompletionResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    personal_shift: bool
    shift_version: str | None = None  # the stored shift that answered (UserStore.version), None: the stage-1 shifts


class Generations(list):
    """Generated texts in input order; `without_personal_shift` names the users that had no stored shift and got
    the stage-1 shifts (the collective shift and the initial personal shift P0 every user starts from)."""

    def __init__(self, texts, without_personal_shift=()):
        super().__init__(texts)
        self.without_personal_shift = list(without_personal_shift)


@dataclass
class GenerationOutput:
    texts: list[str]
    tokens: list[list[int]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # per prompt: [steps, vocab] (float32, on CPU)
    finish: list[str] = field(default_factory=list)  # per prompt: "stop" (EOS or end of answer) or "length"


def _per_row(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@torch.no_grad()
def greedy_generate(model, tok, prompts: list[list[int]], users: list[int] | None = None, shifter: Shifter | None = None,
                    use_collective: bool = True, first: int = 0, last: int = 0, max_new_tokens: int | list[int] = 16,
                    batch_size: int = 32, desc: str = "generating", stop_early: bool = True,
                    share_prefix: bool = True, details: bool = False, with_logits: bool = False,
                    task: bool | list[bool] = True, on_token: Callable[[int, int], bool | None] | None = None):
    """Returns the generation of each prompt (token ids), in input order. `users[i]` is the personal module of prompt
    i (None: no personal shift); `shifter` None: the bare model (else it must be attached).
    Per prompt (a value or a list): `max_new_tokens`, and `task`: a task answer ends at the first newline after some
    text and is cleaned (`clean_prediction`); otherwise the text is decoded as generated and only EOS ends it.
    `stop_early=False` always generates max_new_tokens tokens (for like-for-like throughput measurements).
    `share_prefix`: run the prompt prefix that a batch shares once (once per user where a shift acts inside it).
    `on_token(i, token)`: called for every token generated for prompt i, as it is generated (streaming); a true
    return value ends that prompt's generation there.
    `details`: return a GenerationOutput (texts, tokens, finish reasons); `with_logits`: with each step's logits too."""
    eos = tok.eos_token_id
    newline = set(_newline_ids(tok))
    blank = _blank_ids(tok)
    kw = cache_kwarg(model)
    n_new, is_task = _per_row(max_new_tokens, len(prompts)), _per_row(task, len(prompts))
    # only the last position's logits are needed
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    if share_prefix and users is not None and shifter is not None and first > 0:
        # the prefix then runs once per user in a batch: keep a user's queries together
        order = sorted(range(len(prompts)), key=lambda i: (users[i], len(prompts[i])))
    else:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = GenerationOutput([""] * len(prompts), [[] for _ in prompts], [torch.empty(0)] * len(prompts), ["length"] * len(prompts))
    for s in progress(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[s: s + batch_size]
        res, mask, pos = _prefill(model, [prompts[i] for i in idx], None if users is None else [users[i] for i in idx], shifter,
                                  use_collective, max(first, 0), max(last, 0), tok.pad_token_id, share_prefix and bool(keep), keep)
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        gen = [[] for _ in idx]
        steps: list[torch.Tensor] = []
        done = [n_new[i] <= 0 for i in idx]
        started = [False] * len(idx)  # a newline ends a task answer only once some text was produced
        logits = res.logits[:, -1]
        for step in range(max(n_new[i] for i in idx)):
            nxt = logits.argmax(-1)
            if with_logits:
                steps.append(logits.float().cpu())
            for j, t in enumerate(nxt.tolist()):
                i = idx[j]
                if done[j]:
                    continue
                if stop_early and t == eos:
                    done[j], out.finish[i] = True, "stop"
                    continue
                gen[j].append(t)
                if on_token is not None and on_token(i, t):  # the caller ends this row (a stop string)
                    done[j], out.finish[i] = True, "stop"
                    continue
                if stop_early and is_task[i] and t in newline and started[j]:
                    done[j], out.finish[i] = True, "stop"
                started[j] = started[j] or t not in blank
                if len(gen[j]) >= n_new[i]:
                    done[j] = True
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(len(idx), 1)], dim=1)
            pos = pos[:, -1:] + 1
            res = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, use_cache=True, **keep, **{kw: cache})
            cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
            logits = res.logits[:, -1]
        for j, i in enumerate(idx):
            text = tok.decode(gen[j], skip_special_tokens=True)
            out.texts[i] = clean_prediction(text) if is_task[i] else text
            out.tokens[i] = gen[j]
            if with_logits:
                out.logits[i] = torch.stack([st[j] for st in steps])
    return out if (details or with_logits) else out.texts
