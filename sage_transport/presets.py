"""Named presets shipped in ``presets/kv_transport_presets.yaml`` and validated into configs.

A preset file is ``{version: 1, presets: {name: {purpose: str, hardware: [str], settings: {key: value}}}}``; every setting
is checked as a :class:`~sage_transport.config.KVTransportConfig` key, and a bad file raises ``ConfigError``
naming the file, the key and the value.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from .config import KVTransportConfig
from .errors import ConfigError

__all__ = ["Preset", "PRESET_FILE", "load_presets"]

PRESET_FILE = "kv_transport_presets.yaml"


class Preset(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named set of settings with a one-line purpose and the hardware it is meant for."""

    purpose: str
    settings: dict[str, Any]
    hardware: list[str] = []


class _PresetFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    presets: dict[str, Preset]


def load_presets(path: str | Path | None = None) -> dict[str, Preset]:
    """Presets from ``path`` (default: the file shipped in the package), each validated."""
    import yaml

    if path is None:
        text = resources.files("sage_transport").joinpath("presets", PRESET_FILE).read_text(encoding="utf-8")
        where = f"sage_transport/presets/{PRESET_FILE}"
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read preset file {where}: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset file {where} is not valid YAML: {exc}") from exc
    try:
        parsed = msgspec.convert(raw, _PresetFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"preset file {where}: {exc}") from exc
    if parsed.version != 1:
        raise ConfigError(f"preset file {where}: version={parsed.version!r} is not supported (expected 1)")
    for name, preset in parsed.presets.items():
        if "preset" in preset.settings:
            raise ConfigError(f"preset file {where}: preset {name!r} must not set key 'preset'")
        KVTransportConfig.from_mapping(preset.settings, source=f"preset file {where}, preset {name!r}")
    return dict(parsed.presets)
