"""Per-chunk checksums. A checksum function takes a byte buffer and returns a 63-bit integer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import Integrity

__all__ = ["checksum_function"]

_MASK = (1 << 63) - 1


def checksum_function(mode: Integrity) -> Callable[[Any], int] | None:
    """The checksum for ``mode`` (``None`` when integrity is off). xxh3 runs at memory speed; crc32c
    uses the CPU's instruction where it has one."""
    if mode is Integrity.NONE:
        return None
    if mode is Integrity.XXH3:
        from xxhash import xxh3_64_intdigest

        return lambda buf: xxh3_64_intdigest(buf) & _MASK
    import crc32c

    return crc32c.crc32c  # type: ignore[no-any-return]
