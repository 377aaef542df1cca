"""The main job through the CLI: `sage-transport migrate --transport mock --json PATH`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sage_transport.cli import main


def test_migrate_writes_a_verified_record(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.json"
    code = main(
        ["migrate", "--transport", "mock", "--model", "llama-3-8b", "--tokens", "2048", "--repeat", "2", "--json", str(out)]
    )
    assert code == 0
    record = json.loads(out.read_text())
    for key in ("model", "tokens", "bytes", "seconds", "gbps", "chunks", "transport", "preset", "verified"):
        assert key in record, key
    assert record["model"] == "llama-3-8b" and record["tokens"] == 2048 and record["transport"] == "mock"
    assert record["bytes"] == 2048 * 32 * 2 * 8 * 128 * 2
    assert record["verified"] is True and record["gbps"] > 0 and record["chunks"] >= 1
    assert len(record["seconds_all"]) == 2
    assert "verified" in capsys.readouterr().out


def test_migrate_with_preset_and_config_string(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    code = main(
        [
            "migrate",
            "--tokens",
            "1024",
            "--repeat",
            "1",
            "--preset",
            "low-latency",
            "--config",
            "integrity=crc32c",
            "--json",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert code == 0 and record["preset"] == "low-latency" and record["integrity"] == "crc32c"
    assert record["chunk_size"] == 256 << 10


def test_bad_configuration_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sage_transport.cli", "migrate", "--tokens", "64", "--config", "chunk_size=lots"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "chunk_size='lots'" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "sage_transport.cli", "migrate", "--tokens", "64", "--model", "gpt-9"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "model='gpt-9'" in proc.stderr


def test_migrate_with_a_kv_dtype_reports_the_wire_and_the_error(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.json"
    args = ["migrate", "--transport", "mock", "--tokens", "1024", "--repeat", "1", "--kv-dtype", "fp8_e4m3"]
    assert main([*args, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["verified"] is True and record["kv_dtype"] == "fp8_e4m3" and record["kv_data"] == "synthetic"
    assert record["wire_bytes"] < record["bytes"] * 0.52 and record["compression_ratio"] > 1.9
    assert 0 < record["max_abs_error"] < 1 and 0 < record["mean_abs_error"] < record["max_abs_error"]
    assert "fp8_e4m3: " in capsys.readouterr().out
    code = main(
        [
            "migrate",
            "--transport",
            "mock",
            "--tokens",
            "1024",
            "--repeat",
            "1",
            "--config",
            "compression=zstd",
            "--json",
            str(out),
        ]
    )
    record = json.loads(out.read_text())
    assert code == 0 and record["verified"] is True and record["max_abs_error"] == 0  # lossless
    assert record["kv_dtype"] == "bf16" and record["compression"] == "zstd" and record["wire_bytes"] <= record["bytes"]


def test_verbose_logs_go_to_stderr_and_the_summary_alone_to_stdout() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sage_transport.cli", "migrate", "--transport", "mock", "--tokens", "512", "-v"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "transfer.sent" in proc.stderr and "transfer.sent" not in proc.stdout
    assert proc.stdout.lstrip().startswith("model") and "[info" not in proc.stdout  # the summary, nothing between
