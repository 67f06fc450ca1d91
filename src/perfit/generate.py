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
from .method.shifts import Shifter, ShiftState


@lru_cache(maxsize=8)
def _newline_ids(tok) -> frozenset[int]:
    return frozenset(i for i in range(len(tok)) if "\n" in tok.decode([i]))


@lru_cache(maxsize=8)
def _blank_ids(tok) -> frozenset[int]:
    return frozenset(i for i in range(len(tok)) if not tok.decode([i]).strip())


def _prefill(model, prompts: list[list[int]], users: list[int] | None, shifter: Shifter | None, use_collective: bool,
             first: int, last: int, pad_id: int, share_prefix: bool, keep: dict, max_new: int = 0):
    """The prefill pass of one batch. Returns (output, attention mask, position ids of the last column).

    With a shared prefix it runs once per distinct user (once in all when no shift touches it), its keys/values
    are copied to every row, and the rows' own suffixes follow, left-padded after the prefix: the mask hides
    the gap and positions continue from the prefix, so each row sees exactly its own prompt. `max_new`: the tokens
    decoding will add (a sliding window must hold them too for the prefix to be spliced)."""
    device = next(model.parameters()).device
    B = len(prompts)
    Lp = shared_prompt_prefix(prompts, first, last) if share_prefix else 0
    Lp = Lp if Lp and can_splice(model, max(len(p) for p in prompts) + max_new) else 0  # the widest the batch gets
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


def _order(prompts: list[list[int]], users: list[int] | None, shifter: Shifter | None, share_prefix: bool,
           first: int) -> list[int]:
    """The order prompts are batched in: by length, so that little is padded."""
    if share_prefix and users is not None and shifter is not None and first > 0:
        # the prefix then runs once per user in a batch: keep a user's queries together
        return sorted(range(len(prompts)), key=lambda i: (users[i], len(prompts[i])))
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]))


@dataclass
class _Ends:
    """What ends a row's answer, for the whole call."""
    eos: int | None
    newline: set
    blank: frozenset
    stop_early: bool
    on_token: Callable[[int, int], bool | None] | None


class _Rows:
    """The token bookkeeping of one batch's rows while decoding: their tokens so far, which are done, and why."""

    def __init__(self, idx: list[int], n_new: list[int], is_task: list[bool], finish: list[str], ends: _Ends):
        self.idx, self.n_new, self.is_task, self.finish, self.ends = idx, n_new, is_task, finish, ends
        self.gen: list[list[int]] = [[] for _ in idx]
        self.done = [n_new[i] <= 0 for i in idx]
        self.started = [False] * len(idx)  # a newline ends a task answer only once some text was produced

    def take(self, tokens: list[int]) -> bool:
        """Each row's next token; True when every row is done."""
        e = self.ends
        for j, t in enumerate(tokens):
            i = self.idx[j]
            if self.done[j]:
                continue
            if e.stop_early and t == e.eos:
                self.done[j], self.finish[i] = True, "stop"
                continue
            self.gen[j].append(t)
            if e.on_token is not None and e.on_token(i, t):  # the caller ends this row (a stop string)
                self.done[j], self.finish[i] = True, "stop"
                continue
            if e.stop_early and self.is_task[i] and t in e.newline and self.started[j]:
                self.done[j], self.finish[i] = True, "stop"
            self.started[j] = self.started[j] or t not in e.blank
            if len(self.gen[j]) >= self.n_new[i]:
                self.done[j] = True
        return all(self.done)


def _decode(model, res, mask, pos, rows: _Rows, keep: dict, kw: str, with_logits: bool) -> list[torch.Tensor]:
    """Greedy steps after the prefill until every row is done or at its length; returns each step's logits when
    `with_logits` (else nothing)."""
    cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
    steps: list[torch.Tensor] = []
    logits = res.logits[:, -1]
    for _ in range(max(rows.n_new[i] for i in rows.idx)):
        nxt = logits.argmax(-1)
        if with_logits:
            steps.append(logits.float().cpu())
        if rows.take(nxt.tolist()):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows.idx), 1)], dim=1)
        pos = pos[:, -1:] + 1
        res = model(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos, use_cache=True, **keep, **{kw: cache})
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        logits = res.logits[:, -1]
    return steps


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
    ends = _Ends(tok.eos_token_id, set(_newline_ids(tok)), _blank_ids(tok), stop_early, on_token)
    kw = cache_kwarg(model)
    n_new, is_task = _per_row(max_new_tokens, len(prompts)), _per_row(task, len(prompts))
    # only the last position's logits are needed
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    order = _order(prompts, users, shifter, share_prefix, first)
    out = GenerationOutput([""] * len(prompts), [[] for _ in prompts], [torch.empty(0)] * len(prompts), ["length"] * len(prompts))
    for s in progress(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[s: s + batch_size]
        res, mask, pos = _prefill(model, [prompts[i] for i in idx], None if users is None else [users[i] for i in idx], shifter,
                                  use_collective, max(first, 0), max(last, 0), tok.pad_token_id, share_prefix and bool(keep), keep,
                                  max(n_new[i] for i in idx))
        rows = _Rows(idx, n_new, is_task, out.finish, ends)
        steps = _decode(model, res, mask, pos, rows, keep, kw, with_logits)
        for j, i in enumerate(idx):
            text = tok.decode(rows.gen[j], skip_special_tokens=True)
            out.texts[i] = clean_prediction(text) if is_task[i] else text
            out.tokens[i] = rows.gen[j]
            if with_logits:
                out.logits[i] = torch.stack([st[j] for st in steps])
    return out if (details or with_logits) else out.texts
