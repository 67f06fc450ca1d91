"""Running a decoder in parts: the one home of the mechanisms training and generation share.

- `capture_layer_input` / `lower_states`: the hidden states entering a decoder layer (the frozen layers below the
  lowest shifted one depend on no trainable parameter, so their output can be computed once).
- `skip_lower_layers` + `placeholder_layers`: run only the layers from some layer on, fed with cached states; the
  bypassed layers get placeholder keys/values so the cache still reports the prefix length.
- `prefix_cache` + `splice_layout`: a prompt prefix shared by many rows runs once (once per user when a personal
  shift acts inside it) and its keys/values are spliced in front of every row's own suffix.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .backbone import decoder_layers, sliding_window, text_config
from .method.shifts import Shifter, ShiftState, group_sizes, position_index


def can_splice(model, columns: int | None = None) -> bool:
    """Whether rows can attend to keys/values spliced in front of them, in passes `columns` wide at most (prefix,
    padding and own tokens, generated ones included; None: not known). A sliding window counts columns, so the
    padding between a spliced prefix and a row's own tokens could move prefix tokens out of it; within the window
    (q - k < window for every pair) nothing is cut, spliced or not, and the splice is exact. Wider passes of a
    sliding-window model (Gemma 2/3, Mistral) run whole instead."""
    w = sliding_window(model)
    return w is None or (columns is not None and columns <= w)


def cache_kwarg(module) -> str:
    """The name under which this transformers version takes a KV cache ('cache' from 5.x on); a peft wrapper passes
    it on to the model it wraps."""
    module = module.get_base_model() if hasattr(module, "get_base_model") else module
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def kv_shape(model) -> tuple[int, int]:
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    return getattr(cfg, "num_key_value_heads", None) or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


class _Stop(Exception):
    pass


@contextlib.contextmanager
def capture_layer_input(model, layer: int, stop: bool = False):
    """Yields a dict whose "h" is, after a forward pass, the hidden states entering decoder layer `layer`. With
    `stop` the pass ends there (the layers above are not run; wrap the call in `stops_here`)."""
    captured: dict = {}

    def pre(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        if stop:
            raise _Stop

    handle = decoder_layers(model)[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_layer_outputs(model, layers: list[int]):
    """Yields {layer: hidden states} filled by a forward pass: each layer's output as the layer produced it (a shift
    hooked on that layer afterwards adds its change later; hooks run in the order they were registered)."""
    captured: dict = {}

    def hook(l):
        def fn(module, args, output):
            captured[l] = (output[0] if isinstance(output, tuple) else output).detach()
        return fn

    handles = [decoder_layers(model)[l].register_forward_hook(hook(l)) for l in layers]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def lower_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, layer: int,
                 cache=None) -> torch.Tensor:
    """The hidden states entering decoder layer `layer`; `cache` (optional) also collects the keys/values of the
    layers below it."""
    dec = model.get_decoder()
    kw = {cache_kwarg(dec): cache} if cache is not None else {}
    with capture_layer_input(model, layer, stop=True) as captured:
        try:
            dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=cache is not None, **kw)
        except _Stop:
            pass
    return captured["h"]


class _Skip(nn.Module):
    """Stands in for a frozen lower layer whose output was computed once and cached."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)  # some models read it off the block

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def skip_lower_layers(model, upto: int):
    """Run the model from layer `upto` on: feed the cached input of that layer as the decoder's `inputs_embeds`.
    The blocks stay in place (only bypassed), so per-layer settings indexed by position still line up. Layer `upto`
    receives `inputs_embeds` exactly as given: what a decoder does to its input embeddings before its first layer
    (Granite multiplies them by embedding_multiplier) is not applied to states that went through it already."""
    blocks = decoder_layers(model)
    saved = [blocks[i] for i in range(upto)]
    given: dict = {}

    def take(module, args, kwargs):
        given["h"] = kwargs.get("inputs_embeds")

    def feed(module, args, kwargs):
        h = given.get("h")
        if h is None:
            return None
        if args:
            return (h,) + tuple(args[1:]), kwargs
        return args, kwargs | {"hidden_states": h}

    handles = [model.get_decoder().register_forward_pre_hook(take, with_kwargs=True),
               blocks[upto].register_forward_pre_hook(feed, with_kwargs=True)] if upto > 0 else []
    try:
        for i in range(upto):
            blocks[i] = _Skip(saved[i])
        yield
    finally:
        for h in handles:
            h.remove()
        for i in range(upto):
            blocks[i] = saved[i]


def placeholder_layers(model, cache, upto: int, rows: int, length: int, like: torch.Tensor) -> None:
    """Zero keys/values for the bypassed layers below `upto`: never read (those layers do not run), but the cache
    reports its length from layer 0."""
    kvh, hd = kv_shape(model)
    z = torch.zeros(rows, kvh, length, hd, dtype=like.dtype, device=like.device)
    for i in range(upto):
        cache.update(z, z, i)


def rows_cache(model, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]], low: int, like: torch.Tensor):
    """A cache holding each row's own cached prefix (keys[b][l - low]: [heads, P_b, head_dim] for layers low..),
    left-padded to the longest; the layers below `low` get placeholders (they are bypassed)."""
    device = like.device
    B, n_layers = len(keys), len(decoder_layers(model))
    Pm = max(k[0].shape[-2] for k in keys)
    cache = new_cache(model)
    placeholder_layers(model, cache, low, B, Pm, like)
    for l in range(low, n_layers):
        ref = keys[0][l - low]
        k = torch.zeros(B, ref.shape[0], Pm, ref.shape[-1], dtype=like.dtype, device=device)
        v = torch.zeros_like(k)
        for b in range(B):
            P = keys[b][l - low].shape[-2]
            k[b, :, Pm - P:] = keys[b][l - low].to(device)
            v[b, :, Pm - P:] = values[b][l - low].to(device)
        cache.update(k, v, l)
    return cache


def prefix_state(groups: list[int] | None, nf: int, length: int, use_collective: bool, device) -> ShiftState | None:
    """The shift state of a prefix pass: its first `nf` positions shifted, one row per user of `groups` (None: no
    personal shift, one row)."""
    if nf <= 0:
        return None
    G = len(groups) if groups else 1
    return ShiftState(torch.arange(nf, device=device).expand(G, nf), torch.ones(G, nf, dtype=torch.bool, device=device),
                      torch.tensor(groups, device=device) if groups else None, length, use_collective)


def prefix_cache(model, prefix: list[int], groups: list[int] | None, shifter: Shifter | None, nf: int,
                 use_collective: bool = True, lower_h: torch.Tensor | None = None):
    """Keys/values of a prompt prefix that many rows share, with one row per user of `groups` when a shift acts inside
    it (its first `nf` positions; `groups` None: one row). The layers below the lowest shifted one are the same for every
    user: they run once (or come in as `lower_h`, the cached states entering that layer, in which case they get
    placeholders and the caller bypasses them too). Runs with gradients when the shifts need them."""
    device = next(model.parameters()).device
    dec = model.get_decoder()
    kw = cache_kwarg(dec)
    Lp = len(prefix)
    state = prefix_state(groups, nf, Lp, use_collective, device) if shifter is not None else None
    G = len(groups) if groups else 1
    pos = torch.arange(Lp, device=device).unsqueeze(0)
    ones = torch.ones(1, Lp, dtype=torch.long, device=device)
    cache = new_cache(model)
    ctx = shifter.active(state) if state is not None else contextlib.nullcontext()
    low = min(shifter.layers) if shifter is not None else 0
    if lower_h is None and (G == 1 or low == 0):
        with ctx:
            dec(input_ids=torch.tensor([prefix], device=device).expand(G, Lp), attention_mask=ones.expand(G, Lp),
                position_ids=pos.expand(G, Lp), use_cache=True, **{kw: cache})
        return cache
    shared = None
    if lower_h is None:
        shared = new_cache(model)
        lower_h = lower_states(model, torch.tensor([prefix], device=device), ones, pos, low, shared)
    else:
        lower_h = lower_h.to(device).unsqueeze(0) if lower_h.dim() == 2 else lower_h.to(device)
    with ctx, skip_lower_layers(model, low):
        dec(inputs_embeds=lower_h.expand(G, -1, -1), attention_mask=ones.expand(G, Lp), position_ids=pos.expand(G, Lp),
            use_cache=True, **{kw: cache})
    if shared is None:
        placeholder_layers(model, cache, low, G, Lp, lower_h)
    else:  # bypassed above: the shared layers' keys/values, one copy per row
        for l in range(low):
            cache.update(shared.layers[l].keys.expand(G, -1, -1, -1), shared.layers[l].values.expand(G, -1, -1, -1), l)
    return cache


@dataclass
class SplicedPrefix:
    """A shared prompt prefix run once (once per user when a shift acts inside it), ready for the rows' suffixes."""
    cache: object  # the prefix's keys/values, one row per batch row
    layout: "SpliceLayout"  # the rows' columns: prefix, gap, own suffix
    state: ShiftState | None  # the shift of the suffixes (the last positions lie wholly in them), None: no shift


def splice_shared_prefix(model, prefix: list[int], prompt_lens: list[int], suffix_lens: list[int],
                         users: list[int] | None, shifter: Shifter | None, first: int, last: int,
                         use_collective: bool = True, lower_h: torch.Tensor | None = None) -> SplicedPrefix:
    """The one way training and generation share a prefix: its keys/values (per user where the first shifted
    positions fall inside it, `users[i]` being row i's personal module), copied to every row, the layout that
    puts each row's suffix after it, and the shift state of the suffixes' last positions."""
    device = next(model.parameters()).device
    B, Lp = len(prompt_lens), len(prefix)
    nf = group_sizes(prompt_lens[0], first, 0)[0]  # the same for every row (shared_prompt_prefix checks it)
    groups = sorted(set(users)) if shifter is not None and users is not None and nf > 0 else None
    g_of = {u: g for g, u in enumerate(groups or [])}
    cache = prefix_cache(model, prefix, groups, shifter, nf, use_collective, lower_h=lower_h)
    cache.reorder_cache(torch.tensor([g_of[u] for u in users] if groups else [0] * B, device=device))
    lay = splice_layout([Lp] * B, suffix_lens)
    state = None
    if shifter is not None and last > 0:
        sidx, svalid = position_index(prompt_lens, [o - Lp for o in lay.offsets], 0, last)
        state = ShiftState(sidx.to(device), svalid.to(device),
                           torch.tensor(users, device=device) if users is not None else None, lay.S, use_collective)
    return SplicedPrefix(cache, lay, state)


@dataclass
class SpliceLayout:
    """Rows made of a cached prefix (left-padded to the longest, `Pm` columns) and their own suffix (left-padded to
    `S` columns), so that every row's last token sits in the last column, as decoding needs."""
    mask: torch.Tensor  # [B, Pm + S]
    position_ids: torch.Tensor  # [B, S]
    offsets: list[int]  # each row's suffix padding: suffix token j of row b is column offsets[b] + j
    S: int


def splice_layout(prefix_lens: list[int], suffix_lens: list[int]) -> SpliceLayout:
    Pm, S = max(prefix_lens), max(suffix_lens)
    B = len(prefix_lens)
    mask = torch.zeros(B, Pm + S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    offsets = []
    for b, (P, n) in enumerate(zip(prefix_lens, suffix_lens)):
        off = S - n
        mask[b, Pm - P: Pm] = 1
        mask[b, Pm + off:] = 1
        pos[b] = P + (torch.arange(S) - off).clamp(min=0)
        offsets.append(off)
    return SpliceLayout(mask, pos, offsets, S)


def pad_left(seqs: list, S: int, fill, like: torch.Tensor | None = None) -> torch.Tensor:
    """Left-pad token lists (or [n, d] state tensors, with `like` giving dtype/device) to S rows/columns."""
    if like is None:
        out = torch.full((len(seqs), S), fill, dtype=torch.long)
        for b, s in enumerate(seqs):
            if len(s):
                out[b, S - len(s):] = torch.tensor(s, dtype=torch.long)
        return out
    out = torch.zeros(len(seqs), S, like.shape[-1], dtype=like.dtype, device=like.device)
    for b, s in enumerate(seqs):
        if len(s):
            out[b, S - len(s):] = s.to(like.device)
    return out
