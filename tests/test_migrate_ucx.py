"""The main job over UCX between processes: local receivers, `serve` + `--peer`, the JSON record."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sage_transport.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ucxx") is None, reason="ucxx is not installed")


def test_migrate_to_two_receiver_processes_reports_reference_and_cpu(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.json"
    code = main(["migrate", "--tokens", "2048", "--repeat", "2", "--receivers", "2", "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["transport"] == "ucx" and record["receivers"] == 2 and len(record["peers"]) == 2
    assert record["verified"] is True
    assert record["bytes"] == 2 * 2048 * 28 * 2 * 4 * 128 * 2  # Qwen2.5-7B: 28 layers, 4 KV heads, head dim 128, bf16
    lanes = {lane.split("/")[0] for lanes in record["ucx_transports"].values() for lane in lanes}
    assert lanes & {"posix", "sysv", "cma"}, f"same-host receivers must run on shared memory, got {lanes}"
    assert record["reference_gbps"] > 0 and record["ratio"] == pytest.approx(record["gbps"] / record["reference_gbps"])
    assert "ucx_perftest" in record["reference_command"]
    assert set(record["cpu_seconds"]) == {"sender", "receivers"} and all(v > 0 for v in record["cpu_seconds"].values())
    text = capsys.readouterr().out
    assert "reference" in text and "ratio" in text and "ucx uses" in text


def test_serve_and_migrate_to_peer(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "sage_transport.cli", "serve", "--port", "0", "--once"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening on " in line, line
        address = line.rsplit("listening on ", 1)[1].strip()
        out = tmp_path / "m.json"
        code = main(["migrate", "--peer", address, "--tokens", "1024", "--repeat", "1", "--json", str(out)])
        assert code == 0
        record = json.loads(out.read_text())
        assert record["verified"] is True and record["peers"] == [address]
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()
        server.stdout.close()  # type: ignore[union-attr]


def test_migrate_to_a_dead_peer_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sage_transport.cli", "migrate", "--peer", "127.0.0.1:1", "--tokens", "64"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "127.0.0.1:1" in proc.stderr


async def test_a_bad_job_is_refused_with_the_field_and_value() -> None:
    import asyncio

    from sage_transport.serve import JobChallenge, JobFailed, JobSpec, serve

    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve("127.0.0.1", 0, once=True, ready=ready.set_result))
    host, port = (await ready).rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    spec = JobSpec(model="gpt-9", tokens=64, block_size=16, transport="ucx", config={}, transfer_ids=["t"])
    import msgspec

    assert msgspec.json.decode(await reader.readline(), type=JobChallenge).nonce  # a loopback serve needs no proof

    writer.write(msgspec.json.encode(spec) + b"\n")
    reply = msgspec.json.decode(await reader.readline(), type=JobFailed)
    assert "model='gpt-9'" in reply.reason
    writer.close()
    await asyncio.wait_for(server, 10)


def test_a_receiver_killed_mid_migration_fails_the_job_cleanly() -> None:
    """The receiver process dies during the transfers: migrate exits with an error naming the peer, no hang."""
    import time

    server = subprocess.Popen(
        [sys.executable, "-m", "sage_transport.cli", "serve", "--port", "0", "--once"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().rsplit("listening on ", 1)[1].strip()
        sender = subprocess.Popen(
            [sys.executable, "-m", "sage_transport.cli", "migrate", "--peer", address, "--tokens", "32768",
             "--repeat", "50", "--config", "peer_timeout_s=3s", "--progress", "on"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert sender.stderr is not None
        seen = ""
        while "GB/s" not in seen:  # the progress bar (its rate): transfers are under way
            char = sender.stderr.read(1)
            assert char, f"migrate ended before transferring: {seen}"
            seen += char
        time.sleep(0.5)
        server.kill()
        _, err = sender.communicate(timeout=60)
        assert sender.returncode == 2, err[-2000:]
        assert "error" in err and ("dead" in err or "went away" in err or "gone" in err or "hung up" in err), err[-2000:]
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def test_migrate_int4_to_a_receiver_process_verifies_its_whole_cache(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    args = ["migrate", "--tokens", "1024", "--repeat", "2", "--kv-dtype", "int4", "--config", "compression=lz4"]
    assert main([*args, "--no-reference", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    # the receiver's digest of its whole cache equals the digest of the source through the codec
    assert record["verified"] is True and record["kv_dtypes"] == ["int4", "int4"]
    assert record["wire_bytes"] < record["bytes"] * 0.29 and record["max_abs_error"] > 0


def test_migrate_to_a_service_that_never_answers_is_one_clear_line() -> None:
    """A peer that accepts the connection but speaks no job protocol (here: silence) is named in one line, within
    connect_timeout_s, with no traceback."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        proc = subprocess.run(
            [sys.executable, "-m", "sage_transport.cli", "migrate", "--peer", address, "--tokens", "1024",
             "--config", "connect_timeout_s=1s"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        listener.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{address} accepted the connection but is no `sage-transport serve`" in lines[0]
    assert "no job challenge within 1 s" in lines[0]
