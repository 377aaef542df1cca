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
