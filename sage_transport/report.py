"""Tables that ``sage-transport probe`` and ``sage-transport presets`` print (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .config import KVTransportConfig
from .hw import TopologyInfo, TransportProfile
from .path_probe import PathReport
from .presets import Preset

__all__ = ["print_path", "print_preset", "print_presets", "print_topology"]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def print_topology(console: Console, topology: TopologyInfo, recommended: tuple[str, str], profile: TransportProfile) -> None:
    """Host summary, devices, links, network ports, probe results, the recommendation and the profile."""
    host = Table(title=f"host {topology.hostname}", show_header=False)
    host.add_row("CPU", f"{topology.cpu_model or 'unknown'} × {topology.cpus}")
    for node in topology.numa_nodes:
        host.add_row(f"NUMA node {node.id}", f"{len(node.cpus)} CPUs, {_size(node.memory_bytes)}, distances {node.distances}")
    host.add_row("memory copy", f"{topology.memory_bandwidth_gbps:g} GB/s (one thread, measured)")
    host.add_row("kernel modules", ", ".join(topology.kernel_modules) or "none of interest")
    host.add_row("probe time", f"{topology.elapsed_ms:.1f} ms")
    console.print(host)

    devices = Table(title="devices")
    for column in ("id", "kind", "name", "NUMA", "PCI", "memory"):
        devices.add_column(column)
    for d in topology.devices:
        devices.add_row(
            d.id,
            d.kind.value,
            d.name,
            "-" if d.numa_node is None else str(d.numa_node),
            d.pci_bus_id or "-",
            _size(d.memory_bytes),
        )
    console.print(devices)

    links = Table(title="links")
    for column in ("a", "b", "kind", "GB/s", "µs", "hops", "source", "detail"):
        links.add_column(column)
    for link in topology.links:
        links.add_row(
            link.a,
            link.b,
            link.kind.value,
            f"{link.bandwidth_gbps:g}",
            f"{link.latency_us:g}",
            str(link.hops),
            link.source,
            link.detail,
        )
    console.print(links)

    ports = Table(title="network ports")
    for column in ("name", "kind", "driver/layer", "state", "speed", "NUMA", "PCI"):
        ports.add_column(column)
    for nic in topology.network_interfaces:
        speed = f"{nic.speed_mbps / 1000:g} Gb/s" if nic.speed_mbps else "-"
        kind = "virtual" if nic.virtual else ("ethernet+rdma" if nic.rdma_device else "ethernet")
        ports.add_row(
            nic.name,
            kind,
            nic.driver or "-",
            nic.operstate,
            speed,
            str(nic.numa_node if nic.numa_node is not None else "-"),
            nic.pci_bus_id or "-",
        )
    for port in topology.rdma_ports:
        ports.add_row(
            port.ucx_name,
            "rdma",
            port.link_layer,
            port.state,
            f"{port.rate_gbps:g} Gb/s",
            str(port.numa_node if port.numa_node is not None else "-"),
            port.pci_bus_id or "-",
        )
    console.print(ports)

    probes = Table(title="probes")
    for column in ("probe", "found", "devices", "links", "ms", "reason"):
        probes.add_column(column)
    for status in topology.probes:
        probes.add_row(
            status.name,
            "yes" if status.available else "no",
            str(status.devices),
            str(status.links),
            f"{status.elapsed_ms:.1f}",
            status.reason,
        )
    console.print(probes)

    name, reason = recommended
    console.print(f"[bold]recommended preset:[/bold] {name}: {reason}")
    print_profile(console, profile)


def print_profile(console: Console, profile: TransportProfile) -> None:
    table = Table(
        title=f"transport profile (preset {profile.preset or 'none'}, buffers on {profile.buffer_device})", show_header=False
    )
    table.add_row("backend", profile.backend)
    table.add_row("UCX transports", ",".join(profile.ucx_tls))
    table.add_row("  same host", ",".join(profile.ucx_tls_same_host))
    table.add_row("  remote", ",".join(profile.ucx_tls_remote))
    table.add_row("net devices", ",".join(profile.net_devices) or "UCX picks")
    table.add_row("NIC", profile.nic or "-")
    table.add_row("rails / QPs", f"{profile.rails} / {profile.queue_pairs}")
    table.add_row("connections per remote peer", str(profile.connections_per_peer))
    table.add_row("chunk / window / lanes", f"{_size(profile.chunk_size)} / {profile.window} / {profile.lanes}")
    table.add_row("alignment / max message", f"{profile.alignment} B / {_size(profile.max_message_size)}")
    table.add_row(
        "inline / rendezvous",
        f"{profile.inline_threshold} B / {profile.rndv_threshold if profile.rndv_threshold is not None else 'UCX decides'}",
    )
    table.add_row("progress / endpoint", f"{profile.progress_mode} / {profile.endpoint}")
    table.add_row("zero-copy / GPUDirect RDMA", f"{profile.zero_copy} / {profile.gpu_direct_rdma}")
    for reason in profile.reasons:
        table.add_row("why", reason)
    for warning in profile.warnings:
        table.add_row("[red]warning[/red]", warning)
    console.print(table)


def print_path(console: Console, report: PathReport) -> None:
    table = Table(title=f"path to {report.peer}", show_header=False)
    table.add_row("transport", report.transport + (f" (preset {report.preset})" if report.preset else ""))
    used = "; ".join(f"{k}: {', '.join(v)}" for k, v in report.ucx_transports.items())
    table.add_row("transports used", used or ("our TCP transport" if report.transport == "tcp" else "-"))
    table.add_row("placement", report.placement)
    table.add_row(
        "latency", f"p50 {report.latency_p50_us:g} µs, p99 {report.latency_p99_us:g} µs "
        f"({report.latency_samples} transfers of {_size(report.latency_bytes)}, submit → acknowledged)",
    )  # fmt: skip
    spread = f"{min(report.bandwidth_gbps_all):.2f}-{max(report.bandwidth_gbps_all):.2f}" if report.bandwidth_gbps_all else "-"
    table.add_row("bandwidth", f"{report.bandwidth_gbps:.2f} GB/s median ({spread}) moving {_size(report.bandwidth_bytes)}")
    table.add_row("verified", "yes" if report.verified else "[red]NO[/red]")
    console.print(table)


_SHOWN = {
    "backend": "backend",
    "chunk_size": "chunk",
    "peer_window": "window",
    "max_inflight": "in flight",
    "send_lanes": "lanes",
    "progress_mode": "progress",
    "direct_placement": "placement",
    "integrity": "checksum",
}


def print_presets(console: Console, presets: dict[str, Preset]) -> None:
    table = Table(title="presets (sage-transport presets NAME shows every setting)")
    table.add_column("name", no_wrap=True)
    for header in _SHOWN.values():
        table.add_column(header)
    for name in presets:
        config = KVTransportConfig.resolve(f"preset={name}", env={}, presets={n: p.settings for n, p in presets.items()})
        table.add_row(name, *(_value(getattr(config, key)) for key in _SHOWN))
    console.print(table)
    for name, preset in presets.items():
        console.print(f"[bold]{name}[/bold]: {preset.purpose}")


def print_preset(console: Console, name: str, preset: Preset) -> None:
    config = KVTransportConfig.resolve(f"preset={name}", env={})
    console.print(f"[bold]{name}[/bold]: {preset.purpose}")
    for item in preset.hardware:
        console.print(f"  for: {item}")
    table = Table(title=f"settings of {name} (* set by the preset, others are defaults)")
    table.add_column("key")
    table.add_column("value")
    for key in config.__struct_fields__:
        mark = "*" if key in preset.settings else ""
        table.add_row(f"{key}{mark}", "***" if key == "auth_token" and config.auth_token else _value(getattr(config, key)))
    console.print(table)


def _value(value: Any) -> str:
    if hasattr(value, "value"):
        return str(value.value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 and value % 1024 == 0:
        return _size(value).replace(".0 ", " ")
    return str(value)
