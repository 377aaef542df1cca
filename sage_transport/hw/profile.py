"""``TransportProfile``: what a channel's transport should use on this host, derived from the topology and
a configuration (preset). The UCX transport applies :meth:`TransportProfile.ucx_options` to its context.

Rules, each recorded in ``reasons``:

- Processes of one host talk through shared memory and CMA (plus CUDA/ROCm IPC where GPUs are); TCP is
  only ever in the list for remote peers (same-host UCX endpoints keep peer error handling on shared memory
  through ``UCX_MM_ERROR_HANDLING=y``; the transport warns if one still lands on TCP).
- Remote peers use RDMA (``rc``, ``ud``; ``dc`` on Mellanox) where an active port exists, else TCP.
- Rails are the active RDMA ports nearest the buffer's device (same NUMA node, then fewest PCIe hops),
  fastest first, at most four; the NIC is chosen the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import msgspec

from ..config import KVTransportConfig
from .model import DeviceKind, NetworkInterface, RdmaPort
from .topology import TopologyInfo

__all__ = ["INLINE_THRESHOLD", "MAX_RAILS", "TransportProfile"]

#: GPU vendors whose KV in device memory the channel moves (:mod:`sage_transport.device`; UCX from the ucxx-cu12
#: wheels has CUDA transports): for them the profile adds ``cuda_copy`` and ``cuda_ipc`` for same-host peers,
#: ``cuda_copy`` (pipelining through host memory) for remote ones, and GPUDirect RDMA where the HCA may read GPU
#: memory (``nvidia_peermem``). Other GPUs' KV is moved from host memory (no ROCm UCX in those wheels).
GPU_KV = frozenset({"nvidia"})

#: Payloads up to this size ride inside the UCX transport's head message (one message, no rendezvous).
INLINE_THRESHOLD = 8192
MAX_RAILS = 4
_SHARED_MEMORY_TLS = ("sm", "posix", "sysv", "cma", "xpmem", "knem")


class TransportProfile(msgspec.Struct, frozen=True, kw_only=True):
    """Transport settings for buffers on ``buffer_device`` under ``preset``.

    ``alignment``: chunk and registration granularity; ``max_message_size``: the largest message a chunk
    becomes; ``inline_threshold``: payloads sent inside the head message; ``rndv_threshold``: UCX's
    eager→rendezvous switch (None: UCX decides); ``lanes``: chunk sends in flight per peer; ``rails``:
    network ports striped over; ``queue_pairs``: RC queue pairs per peer (UCX opens one per rail);
    ``connections_per_peer``: connections a channel opens to each remote peer (several TCP streams, see
    :func:`connections_for_remote_peers`).
    """

    preset: str | None
    backend: str
    buffer_device: str
    numa_node: int | None
    alignment: int
    max_message_size: int
    inline_threshold: int
    rndv_threshold: int | None
    chunk_size: int
    window: int
    lanes: int
    progress_mode: str
    endpoint: str
    zero_copy: bool
    gpu_direct_rdma: bool
    ucx_tls_same_host: list[str]
    ucx_tls_remote: list[str]
    ucx_tls: list[str]
    net_devices: list[str]
    nic: str | None
    rails: int
    queue_pairs: int
    connections_per_peer: int = 1
    reasons: list[str]
    warnings: list[str]

    @classmethod
    def derive(cls, topology: TopologyInfo, config: KVTransportConfig, device: str | None = None) -> TransportProfile:
        """The profile for buffers on ``device`` (a topology device id such as ``gpu0`` or ``numa1``;
        default: the NUMA node this process runs on)."""
        reasons: list[str] = []
        warnings: list[str] = []
        numa = _current_numa(topology) if device is None else topology.device(device).numa_node
        device_id = device or f"numa{numa if numa is not None else 0}"
        kind = topology.device(device_id).kind if any(d.id == device_id for d in topology.devices) else DeviceKind.CPU
        vendors = {d.vendor for d in topology.accelerators} | _gpu_vendors_from_pci(topology)

        same_host = ["sm", "cma"]
        if "nvidia" in GPU_KV and "nvidia" in vendors:
            same_host += ["cuda_copy", "cuda_ipc"]
        if "amd" in GPU_KV and "amd" in vendors:
            same_host += ["rocm_copy", "rocm_ipc"]
        same_host.append("self")
        reasons.append(
            f"same-host peers: {','.join(same_host)} (shared memory, CMA{', GPU IPC' if len(same_host) > 3 else ''}; never TCP)"
        )
        if (vendors & {"nvidia", "amd"}) - GPU_KV:
            reasons.append(
                f"{'/'.join(sorted((vendors & {'nvidia', 'amd'}) - GPU_KV))} GPUs here, whose KV is moved from host memory: "
                "no GPU IPC transport or GPUDirect RDMA is configured for them"
            )

        ports = [p for p in topology.rdma_ports if p.active and p.rate_gbps > 0]
        rails_ports = _nearest(ports, numa, lambda p: p.numa_node, lambda p: p.rate_gbps)[:MAX_RAILS]
        if rails_ports:
            best = rails_ports[0].rate_gbps
            rails_ports = [p for p in rails_ports if p.rate_gbps == best]
        remote: list[str] = []
        if rails_ports:
            remote += ["rc", "ud"]
            if any(p.device.startswith("mlx5") for p in rails_ports):
                remote.append("dc")
            reasons.append(
                f"remote peers: RDMA over {', '.join(p.ucx_name for p in rails_ports)} ({rails_ports[0].rate_gbps:g} Gb/s, "
                f"{'InfiniBand' if rails_ports[0].link_layer.lower() == 'infiniband' else 'RoCE'}), nearest NUMA node {numa}"
            )
        if "nvidia" in GPU_KV and "nvidia" in vendors:
            remote.append("cuda_copy")  # device KV to a remote peer without GPUDirect: pipelined through host memory
        remote.append("tcp")
        nics = [n for n in topology.network_interfaces if n.operstate in ("up", "unknown")]
        chosen = _nearest([n for n in nics if not n.virtual] or nics, numa, lambda n: n.numa_node, lambda n: n.speed_mbps or 0)
        nic = chosen[0].name if chosen else None
        if not rails_ports:
            reasons.append(f"remote peers: TCP (no active RDMA port){f' via {nic}' if nic else ''}")

        if config.ucx_tls:
            tls = [t.strip() for t in config.ucx_tls.split(",") if t.strip()]
            reasons.append(f"UCX transports set by ucx_tls={config.ucx_tls!r}")
            if not any(t.lstrip("^") in _SHARED_MEMORY_TLS or t == "all" for t in tls) and not config.ucx_tls.startswith("^"):
                warnings.append(f"ucx_tls={config.ucx_tls!r} has no shared-memory transport: same-host peers will use TCP")
        else:
            tls = same_host + [t for t in remote if t not in same_host]
        net_devices: list[str] = []
        if config.ucx_net_devices:
            net_devices = [d.strip() for d in config.ucx_net_devices.split(",") if d.strip()]
            reasons.append(f"network devices set by ucx_net_devices={config.ucx_net_devices!r}")
        elif rails_ports:
            net_devices = [p.ucx_name for p in rails_ports] + ([nic] if nic else [])
        else:
            reasons.append("network devices: UCX picks (no RDMA port to pin)")

        gpu = kind in (DeviceKind.GPU, DeviceKind.DCU, DeviceKind.NPU, DeviceKind.MLU, DeviceKind.XPU)
        gpu_direct = (
            bool(vendors & GPU_KV) and gpu and bool(rails_ports)
            and bool({"nvidia_peermem", "nv_peer_mem"} & set(topology.kernel_modules))
        )  # fmt: skip
        alignment = 65536 if gpu else 4096
        reasons.append(
            f"alignment {alignment} B ({'GPU pages' if gpu else 'host pages: CMA, memfd windows and RDMA registration'})"
        )
        max_message = max(alignment, config.chunk_size // alignment * alignment)
        streams, why = connections_for_remote_peers(topology, config, bool(rails_ports), chosen[0] if chosen else None)
        reasons.append(why)
        return cls(
            preset=config.preset, backend=config.backend, buffer_device=device_id, numa_node=numa, alignment=alignment,
            max_message_size=max_message, inline_threshold=INLINE_THRESHOLD, rndv_threshold=config.ucx_rndv_threshold,
            chunk_size=config.chunk_size, window=config.peer_window, lanes=config.send_lanes,
            progress_mode=config.progress_mode.value, endpoint=config.ucx_endpoint, zero_copy=config.zero_copy,
            gpu_direct_rdma=gpu_direct, ucx_tls_same_host=same_host, ucx_tls_remote=remote, ucx_tls=tls,
            net_devices=net_devices, nic=nic, rails=max(1, len(rails_ports)), queue_pairs=len(rails_ports),
            connections_per_peer=streams, reasons=reasons, warnings=warnings,
        )  # fmt: skip

    def ucx_options(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """UCX context options (``TLS``, ``NET_DEVICES``, ``MAX_RNDV_RAILS``, ``RNDV_THRESH``); a key the
        user already set as ``UCX_<KEY>`` in the environment is left to the environment."""
        env = os.environ if environ is None else environ
        options: dict[str, str] = {"TLS": ",".join(self.ucx_tls)}
        if self.net_devices:
            options["NET_DEVICES"] = ",".join(self.net_devices)
        if self.rails > 1:
            options["MAX_RNDV_RAILS"] = str(self.rails)
        if self.rndv_threshold is not None:
            options["RNDV_THRESH"] = str(self.rndv_threshold)
        return {k: v for k, v in options.items() if f"UCX_{k}" not in env}


#: a host needs this many cores before a second TCP stream per peer pays: each stream's kernel copies take about a
#: core at full rate, and on two cores two streams moved less than one (bench/README.md, "Across two namespaces")
STREAM_CORES = 8
#: one TCP stream reaches roughly this rate (a core's copy and checksum of a stream): faster NICs get more streams
STREAM_GBPS = 25


def connections_for_remote_peers(
    topology: TopologyInfo, config: KVTransportConfig, rdma: bool, nic: NetworkInterface | None
) -> tuple[int, str]:
    """How many connections a channel opens to each remote peer (``connections_per_peer``; 0 asks for this), and
    why: one where RDMA carries the KV (UCX stripes the rails itself) or the host has under
    :data:`STREAM_CORES` cores; else one per :data:`STREAM_GBPS` of the NIC's speed (unknown: its cores / 4), at
    most 4 and at most a quarter of the cores."""
    if config.connections_per_peer:
        return config.connections_per_peer, f"{config.connections_per_peer} connection(s) per peer: set by connections_per_peer"
    if rdma:
        return 1, "1 connection per remote peer: RDMA (UCX stripes its rails on one endpoint)"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if cores < STREAM_CORES:
        return 1, f"1 connection per remote peer: {cores} cores (a second TCP stream takes a core the first needs)"
    speed = nic.speed_mbps if nic is not None else None
    wanted = cores // 4 if not speed else -(-speed // (STREAM_GBPS * 1000))
    streams = max(1, min(4, cores // 4, wanted))
    link = f"{speed / 1000:g} Gb/s {nic.name}" if speed and nic is not None else "NIC speed unknown"
    return streams, f"{streams} connection(s) per remote peer: TCP over {link}, {cores} cores (one stream ≈ {STREAM_GBPS} Gb/s)"


def _current_numa(topology: TopologyInfo) -> int | None:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = []
    for node in topology.numa_nodes:
        if cpus and cpus[0] in node.cpus:
            return node.id
    return topology.numa_nodes[0].id if topology.numa_nodes else None


def _gpu_vendors_from_pci(topology: TopologyInfo) -> set[str]:
    """GPU vendors seen on the PCI bus (display/3D class), for hosts whose vendor tools are not installed."""
    ids = {"0x10de": "nvidia", "0x1002": "amd"}
    return {ids[p.vendor] for p in topology.pci_devices if p.pci_class.startswith("0x03") and p.vendor in ids}


_Port = TypeVar("_Port", RdmaPort, NetworkInterface)


def _nearest(
    items: list[_Port], numa: int | None, numa_of: Callable[[_Port], int | None], rate_of: Callable[[_Port], float]
) -> list[_Port]:
    """``items`` on the buffer's NUMA node first, then by rate, fastest first."""
    return sorted(items, key=lambda item: (numa_of(item) != numa, -rate_of(item)))
