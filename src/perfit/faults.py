"""Named fault points for the resume and serving tests and the soak benchmark. With PERFIT_FAULT set to one or more
comma-separated `<name>[:<n> | %<n>][=<action>]`, the n-th time (default the first; `%n`: every n-th time) the code
passes `fault_point(<name>)` it acts:

- `kill` (the default): SIGKILL itself, as a power cut or an OOM killer would;
- `raise`: raise InjectedFault there (an error inside the code, such as a CUDA error);
- `wait:<path>`: write `<path>.reached`, then block until the file <path> exists (at most 120 s), so that a test can
  hold the code at that point, see that it is there, act, and let it go on, without sleeping for a guessed time.

Unset (always, outside those tests) it does nothing."""
from __future__ import annotations

import os
import signal
import time

ENV = "PERFIT_FAULT"
WAIT_LIMIT_S = 120.0
_hits: dict[tuple[str, str], int] = {}


class InjectedFault(RuntimeError):
    pass


def reset() -> None:
    """Forget the hits counted so far (tests that set PERFIT_FAULT in-process, one after another)."""
    _hits.clear()


def _parse(spec: str):
    for part in filter(None, (p.strip() for p in spec.split(","))):
        where, _, action = part.partition("=")
        every = "%" in where
        name, _, n = where.partition("%" if every else ":")
        yield name, int(n or 1), every, action or "kill"


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    rules = [r for r in _parse(spec) if r[0] == name]
    if not rules:
        return
    key = (spec, name)
    _hits[key] = count = _hits.get(key, 0) + 1
    for _, n, every, action in rules:  # in order: "p:1=wait:<file>,p:1" holds the code there, then kills it
        if not (count % n == 0 if every else count == n):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "raise":
            raise InjectedFault(f"fault injected at {name} (PERFIT_FAULT)")
        elif action.startswith("wait:"):
            path, end = action[len("wait:"):], time.monotonic() + WAIT_LIMIT_S
            with open(path + ".reached", "w"):
                pass
            while not os.path.exists(path) and time.monotonic() < end:
                time.sleep(0.01)
        else:
            raise ValueError(f"{ENV}: unknown action {action!r} (kill, raise or wait:<path>)")
