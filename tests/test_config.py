"""KVTransportConfig: strings with units, presets, environment, precedence, and errors that name the culprit."""

from __future__ import annotations

import pytest

from sage_transport import ConfigError, Integrity, KVTransportConfig, load_presets
from sage_transport.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512KiB", 512 << 10),
        ("8MiB", 8 << 20),
        ("1GiB", 1 << 30),
        ("1GB", 10**9),
        ("2 mib", 2 << 20),
        (1024, 1024),
    ],
)
def test_sizes_take_units(text: str, expected: int) -> None:
    assert parse_size(text, "chunk_size") == expected


@pytest.mark.parametrize("text", ["8MB/s", "lots", "-1", "1.5B", ""])
def test_bad_sizes_name_field_and_value(text: str) -> None:
    with pytest.raises(ConfigError, match=r"chunk_size="):
        parse_size(text, "chunk_size")


def test_durations() -> None:
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("2min") == 120.0
    assert parse_duration(3) == 3.0
    with pytest.raises(ConfigError, match="ack_timeout_s='soon'"):
        parse_duration("soon", "ack_timeout_s")


def test_string_with_preset_and_override() -> None:
    config = KVTransportConfig.from_string("preset=high-bw,chunk_size=8MiB")
    presets = load_presets()
    assert config.preset == "high-bw"
    assert config.chunk_size == 8 << 20  # explicit beats preset
    assert config.peer_window == presets["high-bw"].settings["peer_window"]


def test_environment_sits_between_preset_and_string() -> None:
    env = {"SAGE_TRANSPORT_PRESET": "low-latency", "SAGE_TRANSPORT_PREFETCH_DEPTH": "3", "SAGE_TRANSPORT_INTEGRITY": "crc32c"}
    config = KVTransportConfig.resolve("integrity=none", env=env)
    assert config.preset == "low-latency"
    assert config.chunk_size == 256 << 10  # from the preset
    assert config.peer_window == 3  # env over preset
    assert config.integrity is Integrity.NONE  # string over env


def test_from_env_alone() -> None:
    config = KVTransportConfig.from_env({"SAGE_TRANSPORT_CHUNK_SIZE": "1MiB", "OTHER": "x"})
    assert config.chunk_size == 1 << 20


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("chunk_sise=8MiB", "unknown key 'chunk_sise'.*did you mean 'chunk_size'"),
        ("chunk_size=huge", "chunk_size='huge'"),
        ("chunk_size=100", "chunk_size=100 must be an integer in 512"),
        ("peer_window=0", "peer_window=0"),
        ("integrity=md5", "integrity='md5'.*xxh3"),
        ("gather=perhaps", "gather='perhaps'"),
        ("verify_placed=nobody", "verify_placed='nobody' is not valid; choose one of writer, receiver"),
        ("preset=turbo", "preset='turbo' is not defined"),
        ("target_dtype=fp7", "target_dtype='fp7'"),
        ("chunk_size", "is not key=value"),
        ("auth_token=short", "auth_token is too weak: about .* bits"),
        ("auth_token=change-me-please", "auth_token is too weak"),
    ],
)
def test_bad_strings_are_refused_by_name(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        KVTransportConfig.resolve(spec, env={})


def test_unknown_environment_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'chunky'.*environment"):
        KVTransportConfig.resolve(None, env={"SAGE_TRANSPORT_CHUNKY": "1"})


def test_token_is_never_printed() -> None:
    config = KVTransportConfig(auth_token="s3cret-token-value-Wq4Z8vN2kP6j")
    assert "s3cret" not in repr(config)
    assert config.auth_token == "s3cret-token-value-Wq4Z8vN2kP6j"


def test_replace_validates() -> None:
    config = KVTransportConfig().replace(chunk_size="2MiB")
    assert config.chunk_size == 2 << 20
    with pytest.raises(ConfigError):
        config.replace(max_retries=-1)


def test_the_window_and_lanes_answer_to_their_old_names_too() -> None:
    """``prefetch_depth`` and ``overlap_streams`` (0.1's names) still work as keys everywhere a key is read, and as
    read-only attributes; the new names win where both are given last."""
    config = KVTransportConfig.from_string("prefetch_depth=32,overlap-streams=3")
    assert (config.peer_window, config.send_lanes) == (32, 3)
    assert (config.prefetch_depth, config.overlap_streams) == (32, 3)
    assert KVTransportConfig.from_env({"SAGE_TRANSPORT_PREFETCH_DEPTH": "5"}).peer_window == 5
    assert config.replace(overlap_streams=4).send_lanes == 4
    assert KVTransportConfig.from_mapping({"prefetch_depth": 2, "peer_window": 9}).peer_window == 9
    with pytest.raises(ConfigError, match="peer_window=0 must be an integer"):
        KVTransportConfig.from_string("prefetch_depth=0")


async def test_a_live_channel_takes_the_old_names_too() -> None:
    from sage_transport import KVTransferChannel

    async with KVTransferChannel("mock", KVTransportConfig(backend="mock")) as channel:
        assert channel.reconfigure(prefetch_depth=3, overlap_streams=5).peer_window == 3
        assert channel.config.send_lanes == 5
        with pytest.raises(ConfigError, match="'backend' cannot change on a live channel"):
            channel.reconfigure(backend="tcp")


def test_shipped_presets_are_valid_and_distinct() -> None:
    presets = load_presets()
    assert {"high-bw", "low-latency", "low-cost"} <= set(presets)
    chunk = {name: KVTransportConfig.resolve(f"preset={name}", env={}).chunk_size for name in presets}
    assert chunk["high-bw"] > chunk["low-cost"] > chunk["low-latency"]
    assert all(p.purpose for p in presets.values())


def test_bad_preset_file_names_file_key_and_value(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\npresets:\n  fast:\n    purpose: x\n    settings:\n      chunk_size: enormous\n")
    with pytest.raises(ConfigError, match=r"chunk_size='enormous'.*p\.yaml, preset 'fast'"):
        load_presets(bad)
    bad.write_text("version: 1\npresets:\n  fast:\n    purpose: x\n    settings: {}\n    colour: red\n")
    with pytest.raises(ConfigError, match=r"p\.yaml.*colour"):
        load_presets(bad)
    bad.write_text("version: 1\npresets:\n  fast:\n    purpose: x\n    settings:\n      warp: 9\n")
    with pytest.raises(ConfigError, match=r"unknown key 'warp'.*p\.yaml"):
        load_presets(bad)
