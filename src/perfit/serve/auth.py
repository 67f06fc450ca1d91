"""Who may talk to a server: the one rule both engines follow. Loopback needs no key; any other address needs one,
read from a file (never from a command line others can read)."""
from __future__ import annotations

import ipaddress

from ..errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as e:
        raise ConfigError(f"--api_key_file {path}: {e.strerror}") from None
    if len(key) < 16:
        raise ConfigError(f"--api_key_file {path}: the key must have at least 16 characters")
    return key


def api_key_for(host: str, api_key_file: str) -> str | None:
    """The key clients must send, None for none; listening beyond loopback without one is refused."""
    key = read_api_key(api_key_file) if api_key_file else None
    if key is None and not is_loopback(host):
        raise ConfigError(f"--host {host}: listening beyond loopback requires --api_key_file")
    return key
