"""What training computes once: the frozen states entering the lowest shifted layer (in memory, else memory-mapped
on disk, else recomputed each epoch), and, with last-positions-only shifts, the keys/values of each example's
unshifted prompt prefix."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import torch

from ..backbone import decoder_layers, text_config
from ..batching import TokenizedExample, frozen_prefix_columns, make_batch, unshifted_prefix_len
from ..prefix import cache_kwarg, can_splice, capture_layer_input, kv_shape, lower_states, new_cache
from ..progress import progress

log = logging.getLogger("perfit")


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


@dataclass
class FrozenPrefix:
    """What one example needs when only its last prompt positions are shifted (no `f` group): the keys/values of the
    unshifted prompt prefix at every layer from the lowest shifted one on, and the states entering that layer for
    the rest (the shifted positions and the target). Causal attention keeps all of it fixed during training."""
    P: int  # prefix tokens
    keys: list[torch.Tensor]  # per layer >= low: [kv_heads, P, head_dim]
    values: list[torch.Tensor]
    suffix_states: torch.Tensor  # [len - P, hidden]


@torch.no_grad()
def compute_frozen_prefix(model, examples: list[TokenizedExample], low: int, last: int, pad_id: int, max_bytes: int,
                          chunk: int = 16, desc: str = "caching frozen prefixes") -> list[FrozenPrefix] | None:
    """One no-grad pass over every example; None when the cache would exceed `max_bytes` (or its passes would not fit
    the model's sliding window: `frozen_prefix_columns`)."""
    if not examples or not can_splice(model, frozen_prefix_columns([(e.prompt_len, len(e.ids) - e.prompt_len)
                                                                     for e in examples], last)):
        return None
    p = next(model.parameters())
    n_layers = len(decoder_layers(model))
    kvh, hd = kv_shape(model)
    d = text_config(model).hidden_size
    plen = [unshifted_prefix_len(e.prompt_len, last) for e in examples]
    need = sum(P * (n_layers - low) * 2 * kvh * hd + (len(e.ids) - P) * d for e, P in zip(examples, plen)) * p.element_size()
    if need > max_bytes:
        log.info("frozen-prefix cache would take %.1f MB > bound %.1f MB: not used", need / 2**20, max_bytes / 2**20)
        return None
    dec = model.get_decoder()
    out: list[FrozenPrefix | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for s in progress(range(0, len(order), chunk), desc=desc, leave=False):
        idx = order[s: s + chunk]
        b = make_batch([examples[i].ids for i in idx], [examples[i].prompt_len for i in idx], [0] * len(idx), pad_id, 1, 0).to(p.device)
        cache = new_cache(model)
        with capture_layer_input(model, low) as captured:
            dec(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=True,
                **{cache_kwarg(dec): cache})
        for j, i in enumerate(idx):
            off, P = b.offsets[j], plen[i]
            out[i] = FrozenPrefix(P, [cache.layers[l].keys[j, :, off: off + P].clone() for l in range(low, n_layers)],
                                  [cache.layers[l].values[j, :, off: off + P].clone() for l in range(low, n_layers)],
                                  captured["h"][j, off + P:].clone())
    return out  # type: ignore[return-value]
