"""Stage 1 (collective shift + initial personal shift) and stage 2 (personal shifts, many users at once)."""
from .loop import TrainStats, train_shifts
from .optim import MaskedAdamW

__all__ = ["MaskedAdamW", "TrainStats", "train_shifts"]
