"""What ranks hand each other under torchrun, as safetensors bytes (never pickle for tensors): an unfinished stage 1's
TrainState, and a trained group of users ({user: tensors}, {user: report})."""
from __future__ import annotations

from safetensors.torch import load, save

from .loop import TrainState


def pack(obj):
    if obj is None:
        return None
    if isinstance(obj, TrainState):
        return ("state", obj.step, save(obj.tensors), obj.stats)
    tensors_of, info = obj
    return ("group", {u: save({k: v.cpu() for k, v in t.items()}) for u, t in tensors_of.items()}, info)


def unpack(obj):
    if obj is None:
        return None
    if obj[0] == "state":
        return TrainState(obj[1], load(obj[2]), obj[3])
    return {u: load(b) for u, b in obj[1].items()}, obj[2]


def deal_out(items: list, work, collect) -> None:
    """`items` dealt to the torchrun ranks in turn (rank r takes r, r + world, ...); each rank runs `work(k, items[k])`
    on its own, and rank 0 gets every result, in order, through `collect(result)`. One process: each in turn."""
    from .. import dist

    ranks, me = (dist.world(), dist.rank()) if dist.enabled() else (1, 0)
    for first in range(0, len(items), ranks):
        k = first + me
        done = work(k, items[k]) if k < len(items) else None
        for got in (dist.gather(pack(done)) or []) if ranks > 1 else [done]:
            got = unpack(got) if ranks > 1 else got
            if got is not None:
                collect(got)
