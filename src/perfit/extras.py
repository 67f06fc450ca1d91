"""Optional dependencies, grouped by use as pyproject.toml's extras are. The core (training, prediction, the Python
API) needs none of them; a command that needs a missing one fails at its start with the extra to install, and plots,
a by-product of commands whose results are JSON, are skipped with a warning instead (a long compare keeps its results)."""
from __future__ import annotations

import importlib.util
import logging

from .errors import PerFitError

log = logging.getLogger("perfit")

# extra -> (what it is called in messages, the modules perfit imports from it)
EXTRAS = {
    "serve": ("server", ("fastapi", "uvicorn", "prometheus_client", "pydantic")),
    "tune": ("tuning", ("optuna",)),
    "plot": ("plotting", ("matplotlib",)),
}


class MissingExtra(PerFitError, ImportError):
    """A command needs an extra that is not installed (the CLI prints it as one line and exits 2)."""

    heading = ""


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported."""
    out = []
    for mod in EXTRAS[extra][1]:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(mod)
    return out


def install_hint(extra: str) -> str:
    return f"pip install 'perfit[{extra}]'"


def require(extra: str, what: str) -> None:
    """Raise MissingExtra naming `extra` unless all its modules are importable; `what` is the command or feature."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(f"{what} needs the {EXTRAS[extra][0]} extra ({', '.join(gone)} not installed): "
                           f"{install_hint(extra)}")


def pyplot(path: str):
    """matplotlib.pyplot on the Agg backend, or None (after a warning that `path` is not written) without the plot
    extra."""
    if missing("plot"):
        log.warning("%s not written: plots need the plotting extra (%s)", path, install_hint("plot"))
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
