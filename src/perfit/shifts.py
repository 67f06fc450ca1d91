"""The low-rank representation shifts (LoReFT form) and their attachment to a frozen decoder.

    delta(h; R, W, b) = R^T (W h + b - R h),   R: r x d with orthonormal rows

`LowRankShift` holds K such modules stacked (K=1: one shared module; K=users: one per user), so a batch
that mixes users gathers each row's own module. R is kept orthonormal by a sign-fixed QR of an
unconstrained matrix, batched over K and always computed in float32 (QR in bf16 is not reliable).
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .backbone import decoder_layers

_POS_RE = re.compile(r"^(?:f(\d+))?(?:\+?l(\d+))?$")


def parse_positions(spec: str) -> tuple[int, int]:
    """'f7+l7' -> (7, 7); 'l7' -> (0, 7); 'f5' -> (5, 0)."""
    m = _POS_RE.match(spec.strip()) if spec else None
    if not m or (m.group(1) is None and m.group(2) is None) or (m.group(1) and m.group(2) and "+" not in spec):
        raise ValueError(f"positions must look like fN, lN or fN+lM (e.g. 'f7+l7'), got {spec!r}")
    first, last = int(m.group(1) or 0), int(m.group(2) or 0)
    if first + last == 0:
        raise ValueError(f"positions {spec!r} selects no token")
    return first, last


def position_index(prompt_lens: list[int], offsets: list[int], first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded [B, P] indices of the shifted prompt positions and their validity mask.

    Positions count real prompt tokens, starting at each row's `offset` (its left padding), so padding
    never shifts them. With a short prompt each group is capped at len // 2 so groups never overlap."""
    P = first + last
    idx = torch.zeros(len(prompt_lens), P, dtype=torch.long)
    valid = torch.zeros(len(prompt_lens), P, dtype=torch.bool)
    for b, (n, off) in enumerate(zip(prompt_lens, offsets)):
        nf, nl = min(first, n // 2), min(last, n // 2)
        pos = list(range(nf)) + list(range(n - nl, n))
        idx[b, : len(pos)] = torch.tensor(pos, dtype=torch.long) + off
        valid[b, : len(pos)] = True
    return idx, valid


# loreft: pyreft's initialisation (random W and b: the first steps start from a perturbed model);
# zero: W = R and b = 0, so every shift starts as the identity
SHIFT_INITS = ("loreft", "zero")


class LowRankShift(nn.Module):
    def __init__(self, num: int, hidden: int, rank: int, generator: torch.Generator | None = None, init: str = "loreft"):
        super().__init__()
        self.num, self.hidden, self.rank = num, hidden, rank
        if rank > hidden:
            raise ValueError(f"rank {rank} exceeds the hidden size {hidden}")
        if init not in SHIFT_INITS:
            raise ValueError(f"shift init {init!r}: choose from {', '.join(SHIFT_INITS)}")
        raw = torch.randn(num, hidden, rank, generator=generator)
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default init for the learned projection
        self.rotate_raw = nn.Parameter(raw)  # R^T before orthonormalisation: [K, d, r]
        self.weight = nn.Parameter((torch.rand(num, rank, hidden, generator=generator) * 2 - 1) * bound)
        self.bias = nn.Parameter((torch.rand(num, rank, generator=generator) * 2 - 1) * bound)
        if init == "zero":  # W = R, b = 0: the shift starts as the identity, the model as it was (like LoRA's B = 0)
            with torch.no_grad():
                self.weight.copy_(self.rotation())
                self.bias.zero_()

    def num_parameters_per_module(self) -> int:
        return 2 * self.hidden * self.rank + self.rank

    def rotation(self) -> torch.Tensor:
        """R with orthonormal rows, [K, r, d]. QR with a positive diagonal is unique, so an R that is
        already orthonormal maps to itself."""
        q, r = torch.linalg.qr(self.rotate_raw.float())
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (q * sign.unsqueeze(-2)).transpose(-1, -2)

    def delta(self, h: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """h: [B, P, d] (float32). which: [B] module index per row (None: module 0 for all)."""
        R, W, b = self.rotation(), self.weight.float(), self.bias.float()
        if which is None:
            R, W, b = R[:1].expand(h.shape[0], -1, -1), W[:1].expand(h.shape[0], -1, -1), b[:1].expand(h.shape[0], -1)
        else:
            R, W, b = R[which], W[which], b[which]
        inner = torch.bmm(h, (W - R).transpose(1, 2)) + b.unsqueeze(1)  # W h + b - R h: [B, P, r]
        return torch.bmm(inner, R)

    def slice_state(self, i: int) -> dict[str, torch.Tensor]:
        return {"rotate_raw": self.rotate_raw[i].detach(), "weight": self.weight[i].detach(), "bias": self.bias[i].detach()}

    @torch.no_grad()
    def load_slice(self, i: int, state: dict[str, torch.Tensor]) -> None:
        self.rotate_raw[i].copy_(state["rotate_raw"])
        self.weight[i].copy_(state["weight"])
        self.bias[i].copy_(state["bias"])


@dataclass
class ShiftState:
    """What the hooks need for one forward pass."""
    index: torch.Tensor  # [B, P] positions to shift
    valid: torch.Tensor  # [B, P]
    users: torch.Tensor | None  # [B] row -> personal module; None: no personal shift
    seq_len: int  # the prefill length; passes of another length (decoding steps) are left alone
    use_collective: bool = True


class Shifter(nn.Module):
    """Collective (1 module per layer) + personal (K modules per layer) shifts, hooked on decoder layers."""

    def __init__(self, hidden: int, layers: list[int], rank: int, user_rank: int, num_users: int = 1, seed: int = 0,
                 init: str = "loreft"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = list(layers)
        # rank 0: no collective shift at all (a personal-only shifter, e.g. the stage-2-only ablation)
        self.collective = nn.ModuleDict({str(l): LowRankShift(1, hidden, rank, g, init) for l in self.layers} if rank > 0 else {})
        self.personal = nn.ModuleDict({str(l): LowRankShift(num_users, hidden, user_rank, g, init) for l in self.layers})
        self.state: ShiftState | None = None
        self._handles: list = []

    @property
    def num_users(self) -> int:
        return next(iter(self.personal.values())).num

    def collective_parameters(self) -> int:
        return sum(m.num_parameters_per_module() for m in self.collective.values())

    def personal_parameters(self) -> int:
        return sum(m.num_parameters_per_module() for m in self.personal.values())

    def set_all_personal(self, source: "Shifter", index: int = 0) -> None:
        """Every personal module becomes a copy of `source`'s module `index` (stage 2 starts each user from P0)."""
        for l in self.layers:
            state = source.personal[str(l)].slice_state(index)
            for k in range(self.num_users):
                self.personal[str(l)].load_slice(k, state)

    def _hook(self, layer: int):
        def hook(module, args, output):
            st = self.state
            if st is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            if h.shape[1] != st.seq_len:
                return None
            d = h.shape[-1]
            gather = st.index.unsqueeze(-1).expand(-1, -1, d)
            hs = h.gather(1, gather).float()
            delta = torch.zeros_like(hs)
            if st.use_collective and str(layer) in self.collective:
                delta = delta + self.collective[str(layer)].delta(hs)
            if st.users is not None:
                delta = delta + self.personal[str(layer)].delta(hs, st.users)
            delta = delta * st.valid.unsqueeze(-1)
            h = h.scatter_add(1, gather, delta.to(h.dtype))
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return hook

    def attach(self, model) -> "Shifter":
        self.detach()
        blocks = decoder_layers(model)
        for l in self.layers:
            if not 0 <= l < len(blocks):
                raise ValueError(f"intervene_layer {l} out of range: the model has {len(blocks)} decoder layers")
            self._handles.append(blocks[l].register_forward_hook(self._hook(l)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def active(self, state: ShiftState):
        prev, self.state = self.state, state
        try:
            yield
        finally:
            self.state = prev


class _Skip(nn.Module):
    """Stands in for a frozen lower layer whose output was computed once and cached."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)  # some models read it off the block

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def skip_lower_layers(model, upto: int):
    """Run the model from layer `upto` on: feed the cached input of that layer as `inputs_embeds`.
    The blocks stay in place (only bypassed), so per-layer settings indexed by position still line up."""
    blocks = decoder_layers(model)
    saved = [blocks[i] for i in range(upto)]
    try:
        for i in range(upto):
            blocks[i] = _Skip(saved[i])
        yield
    finally:
        for i in range(upto):
            blocks[i] = saved[i]


class _Stop(Exception):
    pass


@torch.no_grad()
def lower_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, layer: int,
                 cache_kw: dict | None = None) -> torch.Tensor:
    """The hidden states entering decoder layer `layer` (they depend on no trainable parameter). `cache_kw`
    ({name: KV cache}) also collects the keys/values of the layers below."""
    captured = {}

    def pre(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=cache_kw is not None, **(cache_kw or {}))
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]
