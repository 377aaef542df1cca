"""Turn a ``topo -m`` matrix into links, given what the vendor's fabric words mean."""

from __future__ import annotations

import re
from collections.abc import Callable

from ..matrix import ConnectionMatrix, matrix_devices, pcie_link
from ..model import DeviceKind, Link, LinkKind, VendorResult

__all__ = ["FabricWord", "links_from_matrix"]

#: word → (link kind, GB/s one direction, latency µs, hops) or None when the word is not a fabric link.
FabricWord = Callable[[str], tuple[LinkKind, float, float, int] | None]


def counted(word: str, prefixes: tuple[str, ...]) -> int | None:
    """``ML3`` with prefix ``ML`` → 3 (bonded links); ``MLULINK`` → 1; a word with none of the prefixes → None."""
    for prefix in prefixes:
        match = re.fullmatch(rf"{re.escape(prefix)}[-_]?(\d*)", word)
        if match:
            return int(match.group(1)) if match.group(1) else 1
    return None


def links_from_matrix(
    matrix: ConnectionMatrix, prefix: str, kind: DeviceKind, vendor: str, source: str, fabric: FabricWord
) -> VendorResult:
    devices, ids = matrix_devices(matrix, prefix, kind, vendor, source)
    links: list[Link] = []
    seen: set[frozenset[str]] = set()
    for (row, column), word in matrix.cells.items():
        pair = frozenset((row, column))
        if row not in ids or column not in ids or len(pair) < 2 or pair in seen:
            continue
        seen.add(pair)
        a, b = ids[row], ids[column]
        found = fabric(word)
        if found is not None:
            link_kind, gbps, latency, hops = found
            links.append(
                Link(a=a, b=b, kind=link_kind, bandwidth_gbps=gbps, latency_us=latency, hops=hops, source=source, detail=word)
            )
            continue
        link = pcie_link(a, b, word, source)
        if link is not None:
            links.append(link)
    return VendorResult(devices=devices, links=links)
