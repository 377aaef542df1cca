"""Transports by name: builtin, registered at run time, or from the entry-point group; imported lazily."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sage_transport import ConfigError, UnsupportedError, available_transports, create_transport, register_transport
from sage_transport.transports.mock import MockTransport
from sage_transport.transports.registry import ENTRY_POINT_GROUP, TransportRegistry


def test_mock_is_builtin() -> None:
    assert "mock" in available_transports()
    assert isinstance(create_transport("mock"), MockTransport)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="backend='carrier-pigeon' is not a known transport; known: .*mock"):
        create_transport("carrier-pigeon")


def test_register_a_class_and_refuse_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_transport.transports import registry

    monkeypatch.setattr(registry, "_registry", TransportRegistry({"mock": "sage_transport.transports.mock:MockTransport"}))

    class Loopback(MockTransport):
        name = "loopback-test"

    register_transport("loopback-test", Loopback)
    assert isinstance(create_transport("loopback-test"), Loopback)
    with pytest.raises(ConfigError, match="already registered"):
        register_transport("loopback-test", Loopback)


def test_targets_import_lazily_and_missing_packages_are_unsupported() -> None:
    registry = TransportRegistry({"ghost": "sage_transport_no_such_module:Transport", "notatransport": "json:dumps"})
    assert "ghost" in registry.names()
    with pytest.raises(UnsupportedError, match="transport 'ghost' needs a package that is not installed"):
        registry.get("ghost")
    with pytest.raises(ConfigError, match="is not a Transport subclass"):
        registry.get("notatransport")


def test_entry_point_group_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "thirdparty_transport-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-transport\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nthirdparty = thirdparty_mod:ThirdParty\n")
    (tmp_path / "thirdparty_mod.py").write_text(
        "from sage_transport.transports.mock import MockTransport\nclass ThirdParty(MockTransport):\n    name = 'thirdparty'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = TransportRegistry({})
    assert registry.names() == ["thirdparty"]
    assert "thirdparty_mod" not in sys.modules  # nothing imported until asked for
    assert registry.get("thirdparty").__name__ == "ThirdParty"
