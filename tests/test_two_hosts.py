"""The main job across two "hosts": two network namespaces joined by a veth pair. `sage-transport serve` runs
in one, `sage-transport migrate --peer` in the other. Needs root (the tests create and remove their own
namespaces) and skips otherwise."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2"
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str, str]]:
    """Yields (sender namespace, receiver namespace, receiver IP)."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"sgA{tag}", f"sgB{tag}"
    subnet = 10 + int(tag[:2], 16) % 200
    try:
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", a)
        _ip("link", "set", f"vb{tag}", "netns", b)
        _ip("-n", a, "addr", "add", f"10.{subnet}.7.1/24", "dev", f"va{tag}")
        _ip("-n", b, "addr", "add", f"10.{subnet}.7.2/24", "dev", f"vb{tag}")
        for ns, dev in ((a, f"va{tag}"), (b, f"vb{tag}")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield a, b, f"10.{subnet}.7.2"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


TOKEN = "two-hosts-shared-secret"
#: a serve bound beyond loopback requires a token, and so does everyone who talks to it
ENV = {**os.environ, "SAGE_TRANSPORT_AUTH_TOKEN": TOKEN}


def _cli(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "sage_transport.cli", *args]


def test_serve_beyond_loopback_needs_a_token_and_a_sender_must_prove_it(tmp_path: Path) -> None:
    with two_namespaces() as (sender_ns, receiver_ns, receiver_ip):
        bare = {k: v for k, v in os.environ.items() if k != "SAGE_TRANSPORT_AUTH_TOKEN"}
        refused = subprocess.run(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0", "--once"),
            capture_output=True, text=True, timeout=60, env=bare,
        )  # fmt: skip
        assert refused.returncode != 0 and f"serve --host='{receiver_ip}' is not a loopback address" in refused.stderr
        server = subprocess.Popen(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0"), stdout=subprocess.PIPE, text=True, env=ENV
        )
        try:
            assert server.stdout is not None
            address = server.stdout.readline().rsplit("listening on ", 1)[1].strip()
            for env in (bare, {**bare, "SAGE_TRANSPORT_AUTH_TOKEN": "a-wrong-token-value"}):
                proc = subprocess.run(
                    _cli(sender_ns, "migrate", "--peer", address, "--transport", "tcp", "--tokens", "256"),
                    capture_output=True, text=True, timeout=60, env=env,
                )  # fmt: skip
                assert proc.returncode != 0 and "did not prove the shared auth_token" in proc.stderr, proc.stderr[-800:]
            assert server.poll() is None  # rejected senders do not hurt the serve
        finally:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_migrate_between_two_namespaces(transport: str, tmp_path: Path) -> None:
    with two_namespaces() as (sender_ns, receiver_ns, receiver_ip):
        server = subprocess.Popen(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0", "--once"), stdout=subprocess.PIPE, text=True, env=ENV
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            assert f"listening on {receiver_ip}:" in line, line
            address = line.rsplit("listening on ", 1)[1].strip()
            out = tmp_path / "m.json"
            config = "ucx_tls=tcp" if transport == "ucx" else "chunk_size=4MiB"
            proc = subprocess.run(
                _cli(sender_ns, "migrate", "--peer", address, "--transport", transport, "--config", config,
                     "--tokens", "2048", "--repeat", "2", "--json", str(out)),
                capture_output=True, text=True, timeout=120, env=ENV,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-2000:]
            record = json.loads(out.read_text())
            assert record["verified"] is True and record["peers"] == [address] and record["transport"] == transport
            if transport == "ucx":
                lanes = {lane for lanes in record["ucx_transports"].values() for lane in lanes}
                assert any(lane.startswith("tcp/") for lane in lanes), lanes
            assert server.wait(timeout=30) == 0
        finally:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()


def test_probe_peer_across_namespaces_uses_the_profile_s_network_transport() -> None:
    """No ucx_tls given: the topology profile's UCX transports must still reach a peer behind a veth (a namespace
    has only virtual NICs), and a forced remote endpoint must report TCP lanes, not shared memory."""
    with two_namespaces() as (sender_ns, receiver_ns, receiver_ip):
        server = subprocess.Popen(
            _cli(receiver_ns, "serve", "--host", receiver_ip, "--port", "0"), stdout=subprocess.PIPE, text=True, env=ENV
        )
        try:
            assert server.stdout is not None
            address = server.stdout.readline().rsplit("listening on ", 1)[1].strip()
            probe = _cli(sender_ns, "probe", "--no-vendors", "--json", "--peer", address, "--samples", "20")
            proc = subprocess.run(
                [*probe, "--config", "ucx_endpoint=remote"], capture_output=True, text=True, timeout=120, env=ENV
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            record = json.loads(proc.stdout)
        finally:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
    assert record["profile"]["ucx_tls"][-1] == "tcp" and "tcp" not in record["profile"]["ucx_tls_same_host"]
    path = record["path"]
    assert path["verified"] is True and path["peer"] == address and path["placement"] == "none"
    lanes = {lane for lanes in path["ucx_transports"].values() for lane in lanes}
    assert lanes and all(lane.startswith("tcp/") for lane in lanes), lanes
