"""Which preset suits this host, and why (``sage-transport probe`` prints both)."""

from __future__ import annotations

from .model import LinkKind
from .topology import TopologyInfo

__all__ = ["recommend_preset"]

_FABRICS = (LinkKind.NVLINK, LinkKind.HCCS, LinkKind.MLU_LINK, LinkKind.XGMI, LinkKind.XPU_LINK)


def recommend_preset(topology: TopologyInfo) -> tuple[str, str]:
    """``(preset, reason)`` for moving KV cache off this host.

    - an accelerator fabric or an active RDMA port → ``high-bw`` (large chunks, deep window, zero-copy);
    - only Ethernet without RDMA → ``low-cost`` (our TCP transport, cheap checksum, few threads);
    - no network port at all → ``high-bw`` (peers can only be local: shared memory and CMA).

    ``low-latency`` is a workload choice, never a hardware one: it polls, which costs a core per process.
    """
    fabrics = sorted({link.kind.value for link in topology.links if link.kind in _FABRICS})
    ports = [p for p in topology.rdma_ports if p.active and p.rate_gbps > 0]
    spare = (
        f"; pick low-latency for decode-critical small transfers if a core per process can be spared ({topology.cpus} CPUs here)"
    )
    if fabrics or ports:
        what = []
        if fabrics:
            what.append(f"{len(topology.accelerators)} accelerators joined by {', '.join(fabrics)}")
        if ports:
            best = max(p.rate_gbps for p in ports)
            what.append(f"{len(ports)} active RDMA port(s) up to {best:g} Gb/s")
        return "high-bw", f"{' and '.join(what)}: bulk KV moves at link speed with large chunks and a deep window{spare}"
    nics = [n for n in topology.network_interfaces if n.operstate in ("up", "unknown")]
    if nics:
        nic = max(nics, key=lambda n: (not n.virtual, n.speed_mbps or 0))
        speed = f"{nic.speed_mbps / 1000:g} Gb/s" if nic.speed_mbps else "speed not reported"
        return "low-cost", (
            f"no RDMA port and no accelerator fabric: KV leaves this host over TCP ({nic.name}, {speed}), where "
            f"our TCP transport with 1 MiB chunks and crc32c costs least; same-host peers still place chunks "
            f"directly through shared memory or CMA{spare}"
        )
    return (
        "high-bw",
        "no network port beyond loopback: peers can only be on this host, where shared memory and CMA move bulk KV "
        f"at memory speed{spare}",
    )
