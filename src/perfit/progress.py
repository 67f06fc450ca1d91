"""tqdm progress bars that also report (sparsely) when output goes to a log file instead of a terminal."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, leave: bool = True, initial: int = 0):
    """Only the first process of a torchrun job draws bars (the others would overwrite them); TQDM_DISABLE=1 hides them."""
    tty = sys.stderr.isatty()
    quiet = int(os.environ.get("RANK", "0")) != 0 or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(iterable, desc=desc, total=total, leave=leave, mininterval=0.5 if tty else 30.0, dynamic_ncols=tty,
                initial=initial, disable=quiet)
