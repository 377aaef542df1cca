"""Making a collective backend: by name, through a rendezvous store, with ports from configuration, the
environment, or found free (sageLLM's SagePorts convention). No port is hard-coded.

``env://`` is torch's convention: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. Our own variable
``SAGE_TRANSPORT_COMM_PORT`` wins over ``MASTER_PORT``.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, UnsupportedError
from ..ports import free_port, port_from_env
from ..telemetry.core import Telemetry
from .base import CommBackend
from .fusion import CommFusion

__all__ = ["COMM_BACKENDS", "comm_port", "create_comm_backend", "free_port", "open_comm_store"]

PORT_VARIABLES = ("SAGE_TRANSPORT_COMM_PORT", "MASTER_PORT")

#: Backends by name: module, class, and the devices their tensors live on.
COMM_BACKENDS: dict[str, tuple[str, str, frozenset[str]]] = {
    "gloo": ("sage_transport.collectives.gloo", "GlooBackend", frozenset({"cpu"})),
    "nccl": ("sage_transport.collectives.nccl", "NcclBackend", frozenset({"cuda"})),
    "mock": ("sage_transport.collectives.mock", "MockCommBackend", frozenset({"cpu"})),
}


def comm_port(env: Mapping[str, str] | None = None, *, find_free: bool = True) -> int:
    """The rendezvous port: ``SAGE_TRANSPORT_COMM_PORT``, else ``MASTER_PORT``, else a free one (for the process
    that launches the ranks and tells them). A bad value is a ``ConfigError`` naming the variable."""
    port = port_from_env(os.environ if env is None else env, PORT_VARIABLES)
    if port is not None:
        return port
    if not find_free:
        raise ConfigError(f"no rendezvous port: set {' or '.join(PORT_VARIABLES)}")
    return free_port()


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise ConfigError(f"{name} is not set (env:// needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None


async def open_comm_store(host: str, port: int, rank: int, world_size: int, timeout_s: float = 30.0) -> Any:
    """torch's ``TCPStore`` at ``host:port``, hosted by rank 0 (built in a thread: a client waits for the server)."""
    try:
        import torch.distributed as dist
    except ImportError as exc:
        raise UnsupportedError("collectives over gloo/nccl need torch (pip install 'sage-transport[torch]')") from exc

    def make() -> Any:
        timeout = datetime.timedelta(seconds=timeout_s)
        return dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout, wait_for_workers=False)  # type: ignore[attr-defined]

    try:
        return await asyncio.get_running_loop().run_in_executor(None, make)
    except Exception as exc:
        raise ConfigError(f"rank {rank} could not reach the rendezvous store at {host}:{port}: {exc}") from exc


async def create_comm_backend(
    name: str,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    store: Any = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_s: float = 30.0,
    fusion: CommFusion | None = None,
    overlap: int = 4,
    group: Any = None,
    env: Mapping[str, str] | None = None,
    telemetry: Telemetry | None = None,
) -> CommBackend:
    """A ready backend. ``mock`` needs ``group`` (a ``MockCommGroup``); ``gloo``/``nccl`` use ``store`` if
    given, else a ``TCPStore`` at ``master_addr:master_port`` (defaults from ``env://`` variables)."""
    if name not in COMM_BACKENDS:
        raise ConfigError(f"backend={name!r} is not a collective backend; choose one of {', '.join(COMM_BACKENDS)}")
    options: dict[str, Any] = {"timeout_s": timeout_s, "fusion": fusion, "overlap": overlap, "telemetry": telemetry}
    if name == "mock":
        if group is None:
            raise ConfigError("backend='mock' needs group=MockCommGroup(world_size)")
        return group.backend(rank if rank is not None else 0, **options)  # type: ignore[no-any-return]
    env = os.environ if env is None else env
    rank = _env_int(env, "RANK") if rank is None else rank
    world_size = _env_int(env, "WORLD_SIZE") if world_size is None else world_size
    if store is None:
        host = master_addr or env.get("MASTER_ADDR") or "127.0.0.1"
        port = master_port if master_port is not None else comm_port(env, find_free=False)
        store = await open_comm_store(host, port, rank, world_size, timeout_s)
    import importlib

    module, cls, _ = COMM_BACKENDS[name]
    backend_cls = getattr(importlib.import_module(module), cls)
    return await backend_cls.create(rank, world_size, store, **options)  # type: ignore[no-any-return]
