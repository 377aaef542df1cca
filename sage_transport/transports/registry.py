"""Transports by name, imported lazily; third parties register through the ``sage_transport.transports``
entry-point group (``name = "package.module:TransportClass"``)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigError, UnsupportedError
from .base import Transport

__all__ = ["ENTRY_POINT_GROUP", "available_transports", "create_transport", "get_transport_class", "register_transport"]

ENTRY_POINT_GROUP = "sage_transport.transports"

_BUILTIN: dict[str, str] = {
    "mock": "sage_transport.transports.mock:MockTransport",
    "tcp": "sage_transport.transports.tcp:TcpTransport",
    "ucx": "sage_transport.transports.ucx:UcxTransport",
}


class TransportRegistry:
    """Name → ``"module:Class"`` target; a target is imported only when first asked for."""

    def __init__(self, builtin: dict[str, str]) -> None:
        self._targets = dict(builtin)
        self._loaded: dict[str, type[Transport]] = {}
        self._entry_points_read = False

    def register(self, name: str, target: str | type[Transport]) -> None:
        if name in self._targets or name in self._loaded:
            raise ConfigError(f"transport {name!r} is already registered")
        if isinstance(target, str):
            self._targets[name] = target
        else:
            self._loaded[name] = target

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted(set(self._targets) | set(self._loaded))

    def get(self, name: str) -> type[Transport]:
        if name in self._loaded:
            return self._loaded[name]
        self._read_entry_points()
        target = self._targets.get(name)
        if target is None:
            raise ConfigError(f"backend={name!r} is not a known transport; known: {', '.join(self.names())}")
        module_name, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except ImportError as exc:
            raise UnsupportedError(f"transport {name!r} needs a package that is not installed: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Transport)):
            raise ConfigError(f"transport {name!r} target {target!r} is not a Transport subclass")
        self._loaded[name] = cls
        return cls

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._targets.setdefault(ep.name, ep.value)


_registry = TransportRegistry(_BUILTIN)


def register_transport(name: str, target: str | type[Transport]) -> None:
    """Register a transport class (or a lazy ``"module:Class"`` target) under ``name``."""
    _registry.register(name, target)


def get_transport_class(name: str) -> type[Transport]:
    """The transport class registered as ``name`` (imported on first use)."""
    return _registry.get(name)


def available_transports() -> list[str]:
    """Names of every registered transport (builtin and entry points); not all may import here."""
    return _registry.names()


def create_transport(name: str, **kwargs: Any) -> Transport:
    """Instantiate the transport registered as ``name``."""
    return get_transport_class(name)(**kwargs)
