"""Errors a user can fix (bad flags, bad data, a run dir in another state). The CLI prints these as one line and
exits 2; anything else is a bug and keeps its traceback. No torch here: every layer may raise these."""
from __future__ import annotations


class PerFitError(Exception):
    """A problem with the user's input or files, with a message that names the flag, file, user or field."""

    heading = "error: "  # how `user_message` introduces it


def user_message(e: PerFitError) -> str:
    """What the CLI (and a method's own process under `perfit compare`) prints for such an error, before exit 2."""
    return f"perfit: {e.heading}{e}"


class ConfigError(PerFitError, ValueError):
    """A setting (flag, config field) is invalid."""


class RunStateError(PerFitError):
    """A run dir, checkpoint or user store is missing or was made with other settings."""
