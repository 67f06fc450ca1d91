"""PerFit: personalize a frozen LLM with a collective low-rank shift plus one tiny personal shift per user.

`from perfit import PerFitModel` is the entry point (see perfit.model); it is imported lazily so that the data
layer (`perfit.data`, `perfit.metrics`) never pulls in torch."""

__version__ = "0.1.0"
__all__ = ["PerFitModel"]


def __getattr__(name):
    if name == "PerFitModel":
        from .model import PerFitModel

        return PerFitModel
    raise AttributeError(f"module 'perfit' has no attribute {name!r}")
