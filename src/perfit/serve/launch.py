"""Start `perfit serve` in a child process on a free loopback port and wait until it answers (tests, benchmarks,
notebooks). The child stops by itself after `lifetime` seconds whatever happens to its parent; `stop` ends it and
removes its log."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: str, *args: str, lifetime: float = 300, timeout: float = 120, env: dict | None = None,
           port: int = 0, new_session: bool = False):
    """Returns (process, base url). `args`: more `perfit serve` flags. The server's output goes to a file (a pipe
    nobody reads would fill and stall it), named by `process.log_path`. `new_session`: the server and the processes
    it starts (vLLM's) form a process group of their own, which `kill_group` ends at once."""
    port = port or free_port()
    vllm = any(a == "vllm" and b == "--engine" for b, a in zip(args, args[1:]))
    return start([sys.executable, "-m", "perfit.cli", "serve", "--run_dir", run_dir, "--port", str(port),
                  "--max_lifetime_s", str(lifetime), *args], port,
                 health="/health" if vllm else "/healthz", timeout=timeout, env=env,  # vLLM's server has its own
                 new_session=new_session)


def start(argv: list[str], port: int, health: str = "/healthz", timeout: float = 120, env: dict | None = None,
          what: str = "perfit serve", new_session: bool = False):
    """Start a server command listening on loopback `port`, its output in a log file; wait until `health` answers
    (the standard library's HTTP client: this runs outside tests too)."""
    import urllib.error
    import urllib.request

    fd, log_path = tempfile.mkstemp(prefix="perfit-serve-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)
    proc.log_path = log_path
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + health, timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f} s; its output: {log_path}")


def kill_group(proc) -> None:
    """SIGKILL the server started with new_session=True and every process it started (a power cut, for soak tests)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop(proc, timeout: float = 30) -> str:
    """SIGTERM (in-flight requests finish), SIGKILL after `timeout` s; returns the server's whole output and removes
    its log file."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with open(proc.log_path) as f:
        out = f.read()
    os.unlink(proc.log_path)
    return out
