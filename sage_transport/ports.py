"""Ports by sageLLM's SagePorts convention: read an environment variable, else find one free. None is hard-coded."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

from .errors import ConfigError

__all__ = ["free_port", "port_from_env"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_from_env(env: Mapping[str, str], names: Sequence[str]) -> int | None:
    """The first of ``names`` set in ``env``, as a port; ``ConfigError`` naming the variable for a bad value."""
    for name in names:
        value = env.get(name)
        if value:
            try:
                port = int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r} is not a port number") from None
            if not 1 <= port <= 65535:
                raise ConfigError(f"{name}={value!r} must be in 1..65535")
            return port
    return None
