"""Personalization beside generation: a trainer process that takes the jobs a server queued in the run's store, trains
them and stores the shifts, at the lowest CPU priority, while the server's one worker keeps answering.

Why a process: the shifts are hooked on the model's layers and training bypasses its lower layers, so training and
generation cannot share one model object at once; a training step cannot be cut finer than one forward and backward
pass (seconds on a CPU). A process of its own, niced to 19, gets the CPU only when generation leaves it idle, and the
store (SQLite, versioned, many readers and one writer) is already how processes hand each other users' shifts: the
trainer stores a shift only while its job is still the user's (an erasure or a newer post in the meantime wins), and
the server's next batch reads the new version. The cost: a second copy of the backbone, in the trainer.

    python -m perfit.serve.trainer --run_dir R [--mode train|instant+train] [--device D] [--dtype T]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from ..faults import fault_point

log = logging.getLogger("perfit")
POLL_S = 0.2


def train_pending(pm, mode: str, group: int) -> int:
    """One group of the store's pending jobs trained and stored (those still current). Returns how many were taken."""
    pending = pm.store.pending_jobs()[:group]
    if not pending:
        return 0
    jobs = dict(pending)
    histories = pm.store.take_jobs(jobs)
    if not histories:
        return 0
    try:
        fault_point("engine.train")  # the same fault point as the inline trainer's (soak and fault tests)
        pm.personalize(histories, desc="serve: personalize", jobs={u: jobs[u] for u in histories}, mode=mode)
    except Exception as e:  # noqa: BLE001 - a failed training is the users' status, not the trainer's end
        log.exception("personalization failed for %s", list(histories))
        pm.store.fail_jobs({u: jobs[u] for u in histories}, f"{type(e).__name__}: {e}")
    return len(histories)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="perfit serve's trainer process (internal)")
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--mode", default="train", choices=("train", "instant+train"))
    ap.add_argument("--device", default="")
    ap.add_argument("--dtype", default="")
    ap.add_argument("--nice", type=int, default=19)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[perfit trainer] %(message)s", stream=sys.stderr)
    if a.nice:
        os.nice(a.nice)  # before torch starts its threads: they inherit it
    from ..model import PerFitModel

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    pm = PerFitModel.from_run(a.run_dir, device=a.device or None, dtype=a.dtype or None)
    log.info("training queued users of %s (%s) beside the server", a.run_dir, a.mode)
    parent = os.getppid()
    while not stop and os.getppid() == parent:  # the server gone: stop too
        if not train_pending(pm, a.mode, pm.cfg.user_group_size):
            time.sleep(POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
