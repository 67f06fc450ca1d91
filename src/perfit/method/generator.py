"""The instant path: a user's history -> that user's personal shift in one forward pass, no training.

    z_u  = mean over the user's history items of f(item)          f: what the frozen model computes for the item
    dW, db = head(MLP(standardise(z_u)))                           head zero-initialised
    user's shift = P0 with W = W0 + dW, b = b0 + db                R stays P0's

`f(item)` is, at each shifted layer, the frozen model's hidden state averaged over the item's answer tokens and its
state at the item's last prompt token (the history prompt with its answer, as stage 2 trains on it); no external
embedder. The output is
the same tensors stage 2 trains (`Shifter.user_state`), so the store, versions, erasure and both serving engines take
a generated shift unchanged, and with the head at zero the generator gives exactly stage 1's P0.

Its episodic training on the stage-1 users lives in `train.generator`; this module is the network, the features and
the file format (one safetensors file, its config in the file's own metadata).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..backbone import decoder_layers
from ..batching import TokenizedExample, make_batch, shared_prompt_prefix
from .shifts import user_tensor_names
from ..prefix import cache_kwarg, can_splice, capture_layer_input, pad_left, splice_shared_prefix

FORMAT = "perfit-shift-generator/1"


@dataclass
class GeneratorSpec:
    """What a generator is: the shift it emits and its network's shape (saved with it)."""
    hidden_size: int  # the backbone's d
    layers: list[int]  # the shifted layers, as the run's
    user_rank: int  # r of each personal module
    width: int = 128  # the MLP's hidden width
    dropout: float = 0.1

    @property
    def feature_dim(self) -> int:
        return 2 * len(self.layers) * self.hidden_size

    @property
    def out_dim(self) -> int:
        return len(self.layers) * (self.user_rank * self.hidden_size + self.user_rank)


class ShiftGenerator(nn.Module):
    def __init__(self, spec: GeneratorSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.zeros(spec.feature_dim))
        self.register_buffer("scale", torch.ones(spec.feature_dim))
        self.body = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(spec.feature_dim, spec.width), nn.GELU(),
                                  nn.Dropout(spec.dropout))
        self.head = nn.Linear(spec.width, spec.out_dim)
        nn.init.zeros_(self.head.weight)  # an untrained generator emits no change: exactly stage 1's P0
        nn.init.zeros_(self.head.bias)

    def set_standardisation(self, z: torch.Tensor) -> None:
        """Feature mean and scale from the training users' profiles [N, F] (a user's profile is one row)."""
        with torch.no_grad():
            self.mean.copy_(z.mean(0))
            self.scale.copy_(z.std(0, unbiased=False).clamp(min=1e-4) if len(z) > 1 else torch.ones_like(self.scale))

    def forward(self, z: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """z [B, F] (profiles) -> {layer: (dW [B, r, d], db [B, r])}."""
        s = self.spec
        out = self.head(self.body((z.to(self.mean.dtype) - self.mean) / self.scale))
        per = s.user_rank * s.hidden_size + s.user_rank
        got = {}
        for k, l in enumerate(s.layers):
            chunk = out[:, k * per: (k + 1) * per]
            got[l] = (chunk[:, : s.user_rank * s.hidden_size].view(-1, s.user_rank, s.hidden_size),
                      chunk[:, s.user_rank * s.hidden_size:])
        return got

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def personal_weights(p0: dict[str, torch.Tensor], delta: dict[int, tuple[torch.Tensor, torch.Tensor]]
                     ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (W0 + dW, b0 + db)} for a batch of users, from P0 as flat tensors (`Shifter.user_state(0)`)."""
    out = {}
    for l, (dw, db) in delta.items():
        key = user_tensor_names(l)
        out[l] = (p0[key["weight"]].to(dw.dtype).unsqueeze(0) + dw, p0[key["bias"]].to(db.dtype).unsqueeze(0) + db)
    return out


def user_tensors(p0: dict[str, torch.Tensor], delta: dict[int, tuple[torch.Tensor, torch.Tensor]], k: int
                 ) -> dict[str, torch.Tensor]:
    """User k of a generated batch as the flat tensors the store keeps (the format of `Shifter.user_state`)."""
    out = {}
    for l, (w, b) in personal_weights(p0, delta).items():
        key = user_tensor_names(l)
        out[key["rotate_raw"]] = p0[key["rotate_raw"]].detach().clone()
        out[key["weight"]] = w[k].detach().to(p0[key["weight"]].dtype).clone()
        out[key["bias"]] = b[k].detach().to(p0[key["bias"]].dtype).clone()
    return out


class _Done(Exception):
    pass


@contextlib.contextmanager
def _outputs_until(model, layers: list[int]):
    """Yields {layer: output} filled by a pass that stops after the highest of `layers` (wrap the call in
    `except _Done`)."""
    blocks, top, got = decoder_layers(model), max(layers), {}

    def hook(l):
        def fn(module, args, output):
            got[l] = output[0] if isinstance(output, tuple) else output
            if l == top:
                raise _Done
        return fn

    handles = [blocks[l].register_forward_hook(hook(l)) for l in layers]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _pool(states: dict[int, torch.Tensor], layers: list[int], row: int, last_prompt: int, answer: slice) -> torch.Tensor:
    """One item's feature: per layer, the mean state over its answer tokens and the state at its last prompt token."""
    parts = []
    for l in layers:
        h = states[l][row].float()
        parts += [h[answer].mean(0), h[last_prompt]]
    return torch.cat(parts).cpu()


@torch.no_grad()
def item_features(model, examples: list[TokenizedExample], layers: list[int], pad_id: int, chunk: int = 16,
                  lower_layer: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Per item [N, 2 * len(layers) * d]: at each shifted layer, the frozen model's state averaged over the item's
    answer tokens, then its state at the last prompt token (where the model decides the answer). One no-grad pass
    that stops after the highest shifted layer; the instruction the items share runs once per chunk. With
    `lower_layer`, also each item's states entering that layer (what training caches; full passes), else None."""
    p = next(model.parameters())
    lower = [None] * len(examples) if lower_layer is not None else None
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    rows: dict[int, torch.Tensor] = {}
    dec = model.get_decoder()
    for s in range(0, len(order), chunk):
        idx = order[s: s + chunk]
        exs = [examples[i] for i in idx]
        Lp = 0 if lower is not None or not can_splice(model, max(len(e.ids) for e in exs)) else \
            shared_prompt_prefix([e.ids[: e.prompt_len] for e in exs], 0, 0)
        if Lp:  # the shared prefix once, then each row's own tokens after it
            sp = splice_shared_prefix(model, exs[0].ids[:Lp], [e.prompt_len for e in exs],
                                      [len(e.ids) - Lp for e in exs], None, None, 0, 0)
            lay = sp.layout
            with _outputs_until(model, layers) as got:
                try:
                    dec(input_ids=pad_left([e.ids[Lp:] for e in exs], lay.S, pad_id).to(p.device),
                        attention_mask=lay.mask.to(p.device), position_ids=lay.position_ids.to(p.device),
                        use_cache=True, **{cache_kwarg(dec): sp.cache})
                except _Done:
                    pass
            starts = [o - Lp for o in lay.offsets]  # token j of row b sits at column starts[b] + j
        else:
            b = make_batch([e.ids for e in exs], [e.prompt_len for e in exs], [0] * len(exs), pad_id, 1, 0).to(p.device)
            with _outputs_until(model, layers) as got, \
                    (capture_layer_input(model, lower_layer) if lower is not None else contextlib.nullcontext({})) as cap:
                try:
                    dec(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                        use_cache=False)
                except _Done:
                    pass
            starts = b.offsets
        for j, (i, e) in enumerate(zip(idx, exs)):
            o = starts[j]
            rows[i] = _pool(got, layers, j, o + e.prompt_len - 1, slice(o + e.prompt_len, o + len(e.ids)))
            if lower is not None:
                lower[i] = cap["h"][j, o:].clone()
    feats = torch.stack([rows[i] for i in range(len(examples))]) if examples else torch.zeros(0)
    return feats, lower


def save_generator(path: str, gen: ShiftGenerator, meta: dict, save_fn) -> None:
    """One file: the tensors with the spec and `meta` (what made it) in its metadata. `save_fn(path, tensors, md)` is
    the caller's atomic writer."""
    save_fn(path, gen.state_dict(), {"format": FORMAT, "spec": json.dumps(asdict(gen.spec)), "meta": json.dumps(meta)})


def load_generator(path: str) -> tuple[ShiftGenerator, dict]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        md = f.metadata() or {}
        if md.get("format") != FORMAT:
            raise ValueError(f"{path}: not a PerFit shift generator (format {md.get('format')!r}, expected {FORMAT})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gen = ShiftGenerator(GeneratorSpec(**json.loads(md["spec"]))).to(tensors["head.weight"].dtype)  # as saved
    gen.load_state_dict(tensors)
    gen.eval()
    return gen, json.loads(md["meta"])
