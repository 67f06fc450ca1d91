"""tqdm progress bars that also report (sparsely) when output goes to a log file instead of a terminal."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, leave: bool = True):
    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=leave, mininterval=0.5 if tty else 30.0, dynamic_ncols=tty)
