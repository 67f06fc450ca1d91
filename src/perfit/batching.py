"""Tokenized examples and left-padded batches, shared by training and generation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompts import Example
from .method.shifts import group_sizes, position_index


@dataclass
class TokenizedExample:
    ids: list[int]  # prompt + target (+ EOS)
    prompt_len: int
    module: int = 0  # personal module (user) index
    key: str = ""  # user id, for per-user data order


def tokenize_prompt(tok, prompt: str, max_len: int) -> list[int]:
    """The prompt's token ids, cut to its last `max_len` when longer."""
    if max_len < 1:
        raise ValueError(f"no room for the prompt: at most {max_len} tokens")
    ids = tok(prompt)["input_ids"]
    return ids[-max_len:] if len(ids) > max_len else ids


def tokenize_examples(tok, examples: list[Example], max_length: int, module_of: dict[str, int] | None = None,
                      with_eos: bool = True) -> list[TokenizedExample]:
    """Target ends with EOS so generation stops right after the answer. Over-long examples keep the
    target and the end of the prompt."""
    out = []
    eos = [tok.eos_token_id] if with_eos else []
    for ex in examples:
        tgt = tok(ex.target, add_special_tokens=False)["input_ids"] + eos
        tgt = tgt[: max(1, max_length // 2)]
        prompt = tokenize_prompt(tok, ex.prompt, max_length - len(tgt))
        out.append(TokenizedExample(prompt + tgt, len(prompt), (module_of or {}).get(ex.user_id, 0), ex.user_id))
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: list[int]
    shift_index: torch.Tensor  # [B, P]
    shift_valid: torch.Tensor
    users: torch.Tensor  # [B]

    def to(self, device) -> "Batch":
        for k in ("input_ids", "attention_mask", "position_ids", "shift_index", "shift_valid", "users"):
            setattr(self, k, getattr(self, k).to(device))
        return self


def make_batch(seqs: list[list[int]], prompt_lens: list[int], users: list[int], pad_id: int, first: int, last: int) -> Batch:
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    offsets = []
    for b, s in enumerate(seqs):
        off = T - len(s)
        ids[b, off:] = torch.tensor(s, dtype=torch.long)
        mask[b, off:] = 1
        offsets.append(off)
    pos = (torch.arange(T).unsqueeze(0) - torch.tensor(offsets).unsqueeze(1)).clamp(min=0)
    sidx, svalid = position_index(prompt_lens, offsets, first, last)
    return Batch(ids, mask, pos, offsets, sidx, svalid, torch.tensor(users, dtype=torch.long))


def unshifted_prefix_len(prompt_len: int, last: int) -> int:
    """Prompt tokens before the last-group shifted positions, leaving at least the final prompt token after them."""
    return prompt_len - max(group_sizes(prompt_len, 0, last)[1], 1)


def frozen_prefix_columns(lengths: list[tuple[int, int]], last: int) -> int:
    """The widest pass of a frozen-prefix cache over (prompt, target)-long examples: a training pass spans the longest
    unshifted prefix (rows are left-padded to it) and the longest rest after it; the pass that makes the cache reads
    every column of its longest row back, and a sliding layer keeps only the last window − 1 (one column more)."""
    plen = [unshifted_prefix_len(p, last) for p, _ in lengths]
    spliced = max(plen, default=0) + max((p + t - P for (p, t), P in zip(lengths, plen)), default=0)
    return max(spliced, max((p + t + 1 for p, t in lengths), default=0))


def shared_prompt_prefix(prompts: list[list[int]], first: int, last: int, min_len: int = 8) -> int:
    """Length of the token prefix shared by all prompts that can run once for them all: it holds the same
    first-group shifted positions in every row and none of the last-group ones (and leaves every row one token of
    its own). 0 when sharing does not apply."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts)
    ref = prompts[0]
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == ref[k]:
            k += 1
        n = k
    nfs = {group_sizes(len(p), first, 0)[0] for p in prompts}
    if len(nfs) > 1:
        return 0
    n = min([n] + [unshifted_prefix_len(len(p), last) for p in prompts])
    return n if n >= max(nfs.pop(), min_len) else 0
