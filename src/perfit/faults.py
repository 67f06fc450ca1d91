"""Named crash points for the resume tests: with PERFIT_FAULT=<name>[:<n>] set, the n-th time (default first) the
code passes `fault_point(<name>)` the process kills itself with SIGKILL, as a power cut or an OOM killer would. Unset
(always, outside those tests) it does nothing."""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("PERFIT_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
