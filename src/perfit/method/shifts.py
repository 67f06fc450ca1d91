"""The low-rank representation shifts (LoReFT form) and their attachment to a frozen decoder.

    delta(h; R, W, b) = R^T (W h + b - R h),   R: r x d with orthonormal rows

`LowRankShift` holds K such modules stacked (K=1: one shared module; K=users: one per user), so a batch
that mixes users gathers each row's own module. R is kept orthonormal by a sign-fixed QR of an
unconstrained matrix, batched over K. Shifts compute in float32 at least (QR in bf16 is not reliable), in
float64 when the model and the shifts are float64 (the exactness tests use that).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import check_layers, decoder_layers
from ..config import parse_positions

__all__ = ["parse_positions", "group_sizes", "shifted_positions", "position_index", "LowRankShift", "apply_shift", "ShiftState", "ShiftSource", "user_tensor_names", "Shifter", "shift_hook", "SHIFT_INITS"]


def group_sizes(n: int, first: int, last: int) -> tuple[int, int]:
    """How many of a prompt of n tokens' first and last positions are shifted: `first` and `last`, each capped at
    n // 2 so that the groups never overlap."""
    return min(first, n // 2), min(last, n // 2)


def shifted_positions(n: int, first: int, last: int) -> list[int]:
    """The prompt positions (0-based, of a prompt of n tokens) that the shifts act on (`group_sizes`). The one
    definition that training, generation and the vLLM plugin share."""
    nf, nl = group_sizes(n, first, last)
    return list(range(nf)) + list(range(n - nl, n))


def position_index(prompt_lens: list[int], offsets: list[int], first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded [B, P] indices of the shifted prompt positions and their validity mask: the one place where the
    position groups are laid out.

    Positions count real prompt tokens; a row's token j sits at column j + offset (its left padding, or minus the
    length of a prefix that runs separately), so padding never shifts them. With a short prompt each group is
    capped at len // 2 so groups never overlap."""
    P = max(first + last, 1)
    idx = torch.zeros(len(prompt_lens), P, dtype=torch.long)
    valid = torch.zeros(len(prompt_lens), P, dtype=torch.bool)
    for b, (n, off) in enumerate(zip(prompt_lens, offsets)):
        pos = shifted_positions(n, first, last)
        idx[b, : len(pos)] = torch.tensor(pos, dtype=torch.long) + off
        valid[b, : len(pos)] = True
    return idx, valid


# loreft: pyreft's initialisation (random W and b: the first steps start from a perturbed model);
# zero: W = R and b = 0, so every shift starts as the identity
SHIFT_INITS = ("loreft", "zero")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


class LowRankShift(nn.Module):
    def __init__(self, num: int, hidden: int, rank: int, generator: torch.Generator | None = None, init: str | None = "loreft"):
        super().__init__()
        self.num, self.hidden, self.rank = num, hidden, rank
        self.given: tuple[torch.Tensor, torch.Tensor] | None = None  # (W [K, r, d], b [K, r]) computed elsewhere
        if rank > hidden:
            raise ValueError(f"rank {rank} exceeds the hidden size {hidden}")
        if init is None:  # to be filled by load_slice / load_state_dict: no random draws
            self.rotate_raw = nn.Parameter(torch.zeros(num, hidden, rank))
            self.weight = nn.Parameter(torch.zeros(num, rank, hidden))
            self.bias = nn.Parameter(torch.zeros(num, rank))
            return
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
        q, r = torch.linalg.qr(self.rotate_raw.to(compute_dtype(self.rotate_raw.dtype)))
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (q * sign.unsqueeze(-2)).transpose(-1, -2)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, W - R, b) of every module, [K, r, d], [K, r, d], [K, r], in `dtype` (default: the compute dtype):
        what `apply_shift` takes, computed once where the same modules serve many passes (the vLLM plugin)."""
        dt = dtype or compute_dtype(self.weight.dtype)
        R = self.rotation().to(dt)
        if self.given is None:
            return R, self.weight.to(dt) - R, self.bias.to(dt)
        weight, bias = self.given
        R = R[: weight.shape[0]]
        return R, weight.to(dt) - R, bias.to(dt)

    def delta(self, h: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """h: [B, P, d]. which: [B] module index per row (None: module 0 for all). Returns the shift in the compute
        dtype (float32, or float64 for float64 inputs and parameters)."""
        dt = compute_dtype(h.dtype, self.weight.dtype)
        R, WmR, b = self.factors(dt)
        if which is None:
            R, WmR, b = R[:1].expand(h.shape[0], -1, -1), WmR[:1].expand(h.shape[0], -1, -1), b[:1].expand(h.shape[0], -1)
        else:
            R, WmR, b = R[which], WmR[which], b[which]
        return apply_shift(h.to(dt), R, WmR, b)

    def slice_state(self, i: int) -> dict[str, torch.Tensor]:
        return {"rotate_raw": self.rotate_raw[i].detach(), "weight": self.weight[i].detach(), "bias": self.bias[i].detach()}

    @torch.no_grad()
    def load_slice(self, i: int, state: dict[str, torch.Tensor]) -> None:
        self.rotate_raw[i].copy_(state["rotate_raw"])
        self.weight[i].copy_(state["weight"])
        self.bias[i].copy_(state["bias"])


USER_TENSORS = ("rotate_raw", "weight", "bias")


def user_tensor_names(layer: int) -> dict[str, str]:
    """The key of each of a personal module's tensors at `layer` in a user's flat tensors (the store, the saved
    `users.safetensors`, the bank): the one place the format is written."""
    return {n: f"layer.{layer}.{n}" for n in USER_TENSORS}


def apply_shift(h: torch.Tensor, R: torch.Tensor, WmR: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R^T (W h + b - R h) for each row: h [B, P, d] with its row's factors R, W - R: [B, r, d] and b: [B, r]
    (the one place the shift's formula is computed)."""
    inner = torch.bmm(h, WmR.transpose(1, 2)) + b.unsqueeze(1)  # W h + b - R h: [B, P, r]
    return torch.bmm(inner, R)


@dataclass
class ShiftState:
    """Which tokens one forward pass shifts, in groups that each take one personal module (or bank slot).

    A Hugging Face layer's output is [B, L, d]: group g is batch row g and `index` holds column positions in it; the
    pass is shifted only when its length is `seq_len` (the prefill; decoding steps are left alone). vLLM's layers see
    one flattened batch [T, d]: `index` then holds token indices into it (a group is a request) and `seq_len` is None."""
    index: torch.Tensor  # [G, P] positions to shift (padded: see `valid`)
    valid: torch.Tensor  # [G, P]
    users: torch.Tensor | None  # [G] group -> personal module / bank slot; None: no personal shift
    seq_len: int | None  # the length of the pass that is shifted (3-D outputs only)
    use_collective: bool = True


def shift_hook(source, layer: int, current=None):
    """The one forward hook that adds shifts to a decoder layer's output: training (`Shifter`, differentiable),
    generation and the vLLM plugin (`ShiftBank`, precomputed factors) all apply their shifts through it.
    `source.delta(layer, h [G, P, d], users [G] | None, use_collective)` gives the shifts; `current()` the pass's
    ShiftState (default: `source.state`). vLLM's decoder layers return (hidden, residual) with the next layer
    normalising their sum, so there the layer's output in Hugging Face's sense is that sum: the shift is computed
    from it and added to the residual."""
    get = current or (lambda: source.state)

    def hook(module, args, output):
        st = get()
        if st is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.dim() == 3:
            if hidden.shape[1] != st.seq_len:
                return None
            B, L, d = hidden.shape
            index = st.index + torch.arange(B, device=st.index.device).unsqueeze(1) * L
            flat = hidden.reshape(B * L, d)
            target, hs = flat, flat[index]
        else:
            index, d = st.index, hidden.shape[-1]
            flat = hidden
            residual = output[1] if isinstance(output, tuple) and len(output) == 2 else None
            target = flat if residual is None else residual
            hs = flat[index] if residual is None else flat[index].float() + residual[index].float()
        delta = source.delta(layer, hs, st.users, st.use_collective)
        if delta is None:
            return None
        delta = (delta * st.valid.unsqueeze(-1)).reshape(-1, d).to(target.dtype)
        added = target.index_add(0, index.reshape(-1), delta)
        if hidden.dim() == 3:
            added = added.view(hidden.shape)
        elif target is not flat:  # vLLM: the shift goes to the residual
            return hidden, added
        return (added,) + tuple(output[1:]) if isinstance(output, tuple) else added
    return hook


class ShiftSource:
    """What hooks shifts onto a model: `layers`, a `state` for the current pass and `delta` (see `shift_hook`)."""
    layers: list[int]
    state: ShiftState | None

    def delta(self, layer: int, h: torch.Tensor, users: torch.Tensor | None, use_collective: bool = True):
        raise NotImplementedError

    @contextlib.contextmanager
    def attached(self, model):
        """Hook the shifts onto `model`'s decoder layers for the duration of the block; the hooks never outlive it,
        whatever is raised inside."""
        check_layers(model, self.layers)
        blocks = decoder_layers(model)
        handles = [blocks[l].register_forward_hook(shift_hook(self, l)) for l in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def active(self, state: ShiftState | None):
        prev, self.state = self.state, state
        try:
            yield
        finally:
            self.state = prev


class Shifter(nn.Module, ShiftSource):
    """Collective (1 module per layer) + personal (K modules per layer) shifts, hooked on decoder layers."""

    def __init__(self, hidden: int, layers: list[int], rank: int, user_rank: int, num_users: int = 1, seed: int = 0,
                 init: str | None = "loreft"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = list(layers)
        # rank 0: no collective shift at all (a personal-only shifter, e.g. the stage-2-only ablation)
        self.collective = nn.ModuleDict({str(l): LowRankShift(1, hidden, rank, g, init) for l in self.layers} if rank > 0 else {})
        self.personal = nn.ModuleDict({str(l): LowRankShift(num_users, hidden, user_rank, g, init) for l in self.layers})
        self.state: ShiftState | None = None

    def spawn(self, num_users: int) -> "Shifter":
        """A shifter with this one's collective modules and `num_users` personal modules, each a copy of personal
        module 0 (the P0 every user starts from), on the same device."""
        first = next(iter(self.personal.values()))
        rank = next(iter(self.collective.values())).rank if len(self.collective) else 0
        sh = Shifter(first.hidden, self.layers, rank, first.rank, num_users, init=None).to(first.weight.device, first.weight.dtype)
        sh.collective.load_state_dict(self.collective.state_dict())
        sh.set_all_personal(self)
        return sh

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

    def user_state(self, k: int) -> dict[str, torch.Tensor]:
        """Personal module k as flat tensors (`user_tensor_names`: what the user store keeps)."""
        return {key: self.personal[str(l)].slice_state(k)[n] for l in self.layers for n, key in user_tensor_names(l).items()}

    def load_user_state(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        for l in self.layers:
            self.personal[str(l)].load_slice(k, {n: tensors[key] for n, key in user_tensor_names(l).items()})

    def delta(self, layer: int, h: torch.Tensor, users: torch.Tensor | None, use_collective: bool = True):
        """The shifts of h [G, P, d] at `layer`: the collective one (when used) plus each group's personal module."""
        out = None
        if use_collective and str(layer) in self.collective:
            out = self.collective[str(layer)].delta(h)
        if users is not None:
            pd = self.personal[str(layer)].delta(h, users)
            out = pd if out is None else out + pd
        return out

    @contextlib.contextmanager
    def personal_given(self, given: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        """Within the block, the personal modules' W and b are the given tensors ({layer: (W [K, r, d], b [K, r])},
        e.g. a shift generator's output, gradients flowing back to it); R stays the modules' own."""
        mods = [self.personal[str(l)] for l in given]
        for m, l in zip(mods, given):
            m.given = given[l]
        try:
            yield
        finally:
            for m in mods:
                m.given = None


@torch.no_grad()
def probe_outputs(shifter: Shifter, probes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The effective shifts on fixed probe states [N, d]: {"collective.<l>": [N, d], "personal.<l>": [K, N, d]}.
    Unlike the raw parameters (rotate_raw only matters through its Q factor), these are identifiable."""
    out = {}
    for l in shifter.layers:
        if str(l) in shifter.collective:
            out[f"collective.{l}"] = shifter.collective[str(l)].delta(probes.unsqueeze(0))[0]
        K = shifter.num_users
        out[f"personal.{l}"] = shifter.personal[str(l)].delta(probes.unsqueeze(0).expand(K, -1, -1), torch.arange(K))
    return out
