"""`sage-transport probe` (tables, --json, --peer, --nccl-xml), `sage-transport presets`, engine-style flags,
and the UCX transport set up from the topology profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sage_transport.cli import main
from sage_transport.config import KVTransportConfig
from sage_transport.presets import load_presets


def test_probe_json_carries_topology_recommendation_and_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    for key in ("hostname", "numa_nodes", "devices", "links", "adjacency", "routes", "probes", "elapsed_ms"):
        assert key in record, key
    assert record["recommended_preset"] in load_presets()
    assert record["recommended_reason"]
    assert record["profile"]["preset"] == record["recommended_preset"]
    assert "tcp" not in record["profile"]["ucx_tls_same_host"]
    assert {p["name"] for p in record["probes"]} >= {"nvidia", "ascend", "cambricon", "hygon", "kunlunxin", "amd"}
    assert all(p["available"] or p["reason"] for p in record["probes"])


def test_probe_tables_and_a_chosen_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert (
        main(
            [
                "probe",
                "--no-vendors",
                "--comm-backend",
                "preset=low-latency,chunk_size=128KiB",
                "--nccl-xml",
                str(tmp_path / "t.xml"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "recommended preset:" in captured.out and "transport profile (preset low-latency" in captured.out
    assert "128.0 KiB" in captured.out
    assert not (tmp_path / "t.xml").exists() and "no GPU found" in captured.err


def test_probe_of_an_unknown_device_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--no-vendors", "--device", "gpu7"]) == 2
    assert "device='gpu7' is not in this topology" in capsys.readouterr().err


def test_probe_peer_measures_the_path_to_a_running_receiver(capsys: pytest.CaptureFixture[str]) -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "sage_transport.cli", "serve", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert serve.stdout is not None
        address = serve.stdout.readline().rsplit("listening on ", 1)[1].strip()
        assert main(["probe", "--no-vendors", "--json", "--peer", address, "--samples", "20", "--preset", "high-bw"]) == 0
        path = json.loads(capsys.readouterr().out)["path"]
    finally:
        serve.terminate()
        serve.wait(30)
        if serve.stdout is not None:
            serve.stdout.close()
    assert path["peer"] == address and path["transport"] == "ucx" and path["preset"] == "high-bw"
    assert path["verified"] is True and path["latency_samples"] == 20
    assert 0 < path["latency_p50_us"] <= path["latency_p99_us"]
    assert path["bandwidth_gbps"] > 0 and len(path["bandwidth_gbps_all"]) == 3
    assert path["latency_bytes"] == 28 * 2 * 4 * 128 * 2  # one token of qwen2.5-7b
    used = {t for transports in path["ucx_transports"].values() for t in transports}
    assert used and not any(t.startswith("tcp") for t in used)  # one host: shared memory / CMA, never TCP
    assert path["placement"] in ("shm", "cma")


def test_presets_list_show_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("high-bw", "low-latency", "low-cost"))
    assert main(["presets", "low-latency"]) == 0
    out = capsys.readouterr().out
    assert "progress_mode*" in out and "polling" in out and "for:" in out
    assert main(["presets", "high-bw", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown) == ["high-bw"] and shown["high-bw"]["config"]["chunk_size"] == 8 << 20
    assert shown["high-bw"]["hardware"]
    assert main(["presets", "warp-speed"]) == 2
    assert "preset 'warp-speed' is not defined" in capsys.readouterr().err


def test_presets_validates_a_user_file_naming_file_key_and_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("version: 1\npresets:\n  fast:\n    purpose: x\n    settings:\n      progress_mode: busy\n")
    assert main(["presets", "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "progress_mode='busy'" in err and "mine.yaml" in err and "'fast'" in err


def test_shipped_presets_state_what_was_measured_to_matter() -> None:
    presets = load_presets()
    for name, preset in presets.items():
        assert preset.hardware, name
        for key in ("progress_mode", "chunk_size", "peer_window", "send_lanes"):
            assert key in preset.settings, (name, key)
    assert presets["low-latency"].settings["progress_mode"] == "polling"
    assert presets["high-bw"].settings["ucx_endpoint"] == "auto"


def test_engine_style_strings_and_flags() -> None:
    config = KVTransportConfig.from_string("preset=high-bw,chunk_size=8MiB,kv_dtype=fp8_e4m3")
    assert config.preset == "high-bw" and config.chunk_size == 8 << 20 and config.target_dtype is not None
    assert config.target_dtype.value == "fp8_e4m3"
    from sage_transport.cli import _parser, _resolve_config

    args = _parser().parse_args(["probe", "--comm-backend", "preset=low-cost", "--kv-dtype=fp8_e4m3"])
    resolved = _resolve_config(args)
    assert resolved.backend == "tcp" and resolved.target_dtype is not None and resolved.target_dtype.value == "fp8_e4m3"
    with pytest.raises(Exception, match="ucx_endpoint='nearby'"):
        KVTransportConfig.from_string("ucx_endpoint=nearby")


def test_migrate_uses_the_preset_it_names(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    code = main(
        [
            "migrate",
            "--transport",
            "mock",
            "--tokens",
            "512",
            "--repeat",
            "1",
            "--comm-backend",
            "preset=low-latency",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["preset"] == "low-latency" and record["chunk_size"] == 256 << 10


def test_ucx_transport_is_set_up_from_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_transport.transports.ucx import UcxTransport

    monkeypatch.delenv("UCX_TLS", raising=False)
    transport = UcxTransport.from_config(KVTransportConfig.resolve("preset=low-latency", env={}))
    assert transport.profile is not None and transport.profile.preset == "low-latency"
    assert transport.tls is not None and transport.tls.split(",")[:2] == ["sm", "cma"]
    assert transport.locality == "auto"
    monkeypatch.setenv("UCX_TLS", "tcp,self")
    assert UcxTransport.from_config(KVTransportConfig()).tls is None  # the environment's UCX_TLS wins
    forced = UcxTransport.from_config(KVTransportConfig(ucx_tls="tcp", ucx_endpoint="remote"))
    assert forced.locality == "remote"
