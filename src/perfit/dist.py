"""torch.distributed for `torchrun`: which process this is and the few collectives PerFit needs. With no torchrun
(WORLD_SIZE unset or 1) every function is a no-op or the identity, so a plain process runs unchanged.

Roles: stage 1 is data-parallel (every rank runs its share of each step's rows, gradients are summed across ranks
before the identical update on every rank); stage 2 gives each rank whole user groups in turn, and rank 0, the only
writer of the run dir, stores every group, predicts and writes the outputs. Tensors travel as safetensors bytes."""
from __future__ import annotations

import os

import torch


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def enabled() -> bool:
    import torch.distributed as d

    return world() > 1 and d.is_available() and d.is_initialized()


def is_main() -> bool:
    return rank() == 0


def setup() -> None:
    """Join the torchrun job (gloo on CPU, nccl on GPU; each local rank on its own GPU)."""
    import torch.distributed as d

    if world() <= 1 or d.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    d.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def teardown() -> None:
    import torch.distributed as d

    if d.is_available() and d.is_initialized():
        d.barrier()
        d.destroy_process_group()


def barrier() -> None:
    if enabled():
        import torch.distributed as d

        d.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on every rank (through the GPU when the backend is nccl)."""
    if enabled():
        import torch.distributed as d

        if d.get_backend() == "nccl" and not t.is_cuda:
            g = t.cuda()
            d.all_reduce(g)
            t.copy_(g.cpu())
        else:
            d.all_reduce(t)
    return t


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not enabled():
        return obj
    import torch.distributed as d

    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not enabled():
        return [obj]
    import torch.distributed as d

    out = [None] * world() if is_main() else None
    d.gather_object(obj, out, dst=0)
    return out
