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
