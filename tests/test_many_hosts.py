"""Many "hosts" found through one real etcd: eight network namespaces on a bridge, every host's link shaped to
10 Gbit/s with tc tbf, one `sage-transport serve --store` per decode host; a prefill migrates to every decode it
finds (fan-out), then seven prefills migrate to one decode at once (fan-in). Needs root, iproute2, tc and etcd
(the tests create and remove their own namespaces and server) and skips, saying which, otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage_transport.testing.etcd import EtcdServer, etcd_binary, registered_serves
from sage_transport.testing.hosts import EmulatedHosts, HostsUnavailable, stop_processes

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None, reason="emulated hosts need root, ip and tc"),
    pytest.mark.skipif(etcd_binary() is None, reason="no etcd binary (Debian: apt-get install etcd-server)"),
]

TOKEN = "many-hosts-shared-secret-Vq7Lm2Xc9Tb4"
ENV = {**os.environ, "SAGE_TRANSPORT_AUTH_TOKEN": TOKEN}
HOSTS = 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[EmulatedHosts, EtcdServer]]:
    pytest.importorskip("aetcd")
    try:
        hosts = EmulatedHosts(HOSTS, rate_gbit=10).__enter__()
    except HostsUnavailable as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        with EtcdServer(hosts.bridge_ip) as etcd:
            yield hosts, etcd
    finally:
        hosts.__exit__(None, None, None)


def _serve(hosts: EmulatedHosts, host: int, etcd: EtcdServer, name: str, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "sage_transport.cli", "serve", "--host", hosts.ip(host), "--store", etcd.url,
               "--name", name, "--ttl", "3", *extra]  # fmt: skip
    proc = hosts.run(host, command, stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    assert "listening on" in proc.stdout.readline()
    assert f"registered as {name}" in proc.stdout.readline()
    return proc


def _migrate(hosts: EmulatedHosts, host: int, etcd: EtcdServer, out: Path, *targets: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "sage_transport.cli", "migrate", "--store", etcd.url, *targets, "--transport", "tcp",
               "--tokens", "1024", "--repeat", "1", "--no-reference", "--json", str(out)]  # fmt: skip
    return hosts.run(host, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_a_prefill_migrates_to_every_decode_it_finds_in_etcd(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts, etcd = cluster
    serves = [_serve(hosts, host, etcd, f"decode-{host}") for host in range(1, HOSTS)]
    try:
        out = tmp_path / "fan-out.json"
        proc = _migrate(hosts, 0, etcd, out, "--to-all")
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        record = json.loads(out.read_text())
        assert record["verified"] is True
        assert len(record["peers"]) == HOSTS - 1  # every decode, each found through etcd by its registration
        assert {peer.split(":")[0] for peer in record["peers"]} == {hosts.ip(host) for host in range(1, HOSTS)}
    finally:
        stop_processes(serves)


def test_seven_prefills_migrate_to_one_decode_at_once(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hosts, etcd = cluster
    serve = _serve(hosts, 0, etcd, "decode-main")
    try:
        outs = [tmp_path / f"fan-in-{host}.json" for host in range(1, HOSTS)]
        procs = [_migrate(hosts, host, etcd, out, "--to", "decode-main") for host, out in zip(range(1, HOSTS), outs)]
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-2000:]
        for out in outs:
            record = json.loads(out.read_text())
            assert record["verified"] is True and [p.split(":")[0] for p in record["peers"]] == [hosts.ip(0)]
    finally:
        stop_processes([serve])


def test_a_decode_killed_mid_run_fails_alone_and_leaves_the_membership(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import signal
    import time

    hosts, etcd = cluster
    serves = [_serve(hosts, host, etcd, f"doomed-{host}" if host == 3 else f"decode-{host}") for host in range(1, 5)]
    try:
        out = tmp_path / "kill.json"
        command = [sys.executable, "-m", "sage_transport.cli", "migrate", "--store", etcd.url, "--to-all", "--transport",
                   "tcp", "--tokens", "4096", "--repeat", "4", "--no-reference", "--progress", "on",
                   "--json", str(out)]  # fmt: skip
        proc = hosts.run(0, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        assert proc.stderr is not None
        while "moving the cache" not in (line := proc.stderr.readline()):
            assert line, "migrate ended before moving anything"
        time.sleep(0.5)
        victim = serves[2]  # host 3
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 1, err[-2000:]  # not every receiver got the cache ...
        record = json.loads(out.read_text())
        assert record["verified"] is True  # ... but every one that did got it whole
        assert list(record["failed"]) == [p for p in record["peers"] if p.startswith(hosts.ip(3) + ":")]
        reason = next(iter(record["failed"].values()))
        assert reason.split(":")[0] in {"PeerDeadError", "ConnectionClosedError", "TransportError"}, reason

        while "doomed-3" in registered_serves(etcd.url):
            assert time.monotonic() - killed < 3 + 5, "the killed serve's registration outlived its TTL"
            time.sleep(0.2)
        assert set(registered_serves(etcd.url)) >= {"decode-1", "decode-2", "decode-4"}
    finally:
        stop_processes(serves)
