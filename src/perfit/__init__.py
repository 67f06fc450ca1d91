"""PerFit: personalize a frozen LLM with a collective low-rank shift plus one tiny personal shift per user."""

__version__ = "0.1.0"
