"""Parsing of human-written sizes (``8MiB``), durations (``250ms``) and booleans, with errors naming the field."""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

__all__ = ["format_size", "parse_bool", "parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: Any, field: str = "size") -> int:
    """``4096``, ``"512KiB"``, ``"8MiB"``, ``"1GB"`` → bytes (binary units are powers of 1024)."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{field}={value!r} must not be negative")
        return value
    match = _NUMBER.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(f"{field}={value!r} is not a size; write e.g. 4096, 512KiB, 8MiB, 1GiB")
    number = float(match.group(1)) * _SIZE_UNITS[unit]
    if number != int(number):
        raise ConfigError(f"{field}={value!r} is not a whole number of bytes")
    return int(number)


def parse_duration(value: Any, field: str = "duration") -> float:
    """``5``, ``"5s"``, ``"250ms"``, ``"2min"`` → seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _NUMBER.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _DURATION_UNITS:
            raise ConfigError(f"{field}={value!r} is not a duration; write e.g. 5, 5s, 250ms")
        seconds = float(match.group(1)) * _DURATION_UNITS[unit]
    if seconds < 0:
        raise ConfigError(f"{field}={value!r} must not be negative")
    return seconds


def parse_bool(value: Any, field: str = "flag") -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{field}={value!r} is not a boolean; write true or false")


def format_size(nbytes: float) -> str:
    """Bytes in binary units, for humans: ``1.75 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"
