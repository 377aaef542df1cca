"""Per-chunk checksums. A checksum function takes a byte buffer and returns a 63-bit integer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import Integrity

__all__ = ["checksum_function", "streaming_checksum_function"]

_MASK = (1 << 63) - 1


def checksum_function(mode: Integrity) -> Callable[[Any], int] | None:
    """The checksum for ``mode`` (``None`` when integrity is off). xxh3 runs at memory speed; crc32c
    uses the CPU's instruction where it has one."""
    if mode is Integrity.NONE:
        return None
    if mode is Integrity.FLETCHER64:
        from .device.checksum import fletcher64

        return fletcher64
    if mode is Integrity.XXH3:
        from xxhash import xxh3_64_intdigest

        return lambda buf: xxh3_64_intdigest(buf) & _MASK
    import crc32c

    return crc32c.crc32c  # type: ignore[no-any-return]


def streaming_checksum_function(mode: Integrity) -> Callable[[Any], int] | None:
    """Like :func:`checksum_function` over the concatenation of a sequence of buffers (scattered pieces),
    without joining them: equal to ``checksum_function(mode)(b"".join(pieces))``."""
    if mode is Integrity.NONE:
        return None
    if mode is Integrity.FLETCHER64:
        from .device.checksum import fletcher64_pieces

        return fletcher64_pieces
    if mode is Integrity.XXH3:
        from xxhash import xxh3_64

        def xxh3_pieces(pieces: Any) -> int:
            h = xxh3_64()
            for piece in pieces:
                h.update(piece)
            return h.intdigest() & _MASK

        return xxh3_pieces
    import crc32c

    def crc32c_pieces(pieces: Any) -> int:
        value = 0
        for piece in pieces:
            value = crc32c.crc32c(piece, value)
        return value  # type: ignore[no-any-return]

    return crc32c_pieces
