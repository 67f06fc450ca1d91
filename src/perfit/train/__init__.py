"""Stage 1 (collective shift + initial personal shift) and stage 2 (personal shifts, many users at once)."""
from .batching import TokenizedExample, tokenize_examples
from .loop import MaskedAdamW, TrainStats, train_shifts

__all__ = ["TokenizedExample", "tokenize_examples", "MaskedAdamW", "TrainStats", "train_shifts"]
