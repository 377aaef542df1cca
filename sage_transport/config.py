"""``KVTransportConfig``: every knob of a channel, built from presets, ``key=value`` strings and the environment.

Precedence, lowest first: defaults < preset < environment (``SAGE_TRANSPORT_*``) < explicit string or mapping.
Unknown keys and bad values raise :class:`~sage_transport.errors.ConfigError` naming the key, the value and
where it came from.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import os
import stat
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .errors import ConfigError
from .schema import DType
from .units import parse_bool, parse_duration, parse_size

__all__ = ["Compression", "ENV_PREFIX", "Integrity", "KVTransportConfig", "ProgressMode"]

ENV_PREFIX = "SAGE_TRANSPORT_"


class Integrity(str, enum.Enum):
    """Per-chunk checksum: xxh3 (64-bit, fastest on a CPU), crc32c, fletcher64 (two sums a GPU reduces where the
    KV lives: what a channel with device memory sends; any side verifies it), or none."""

    XXH3 = "xxh3"
    CRC32C = "crc32c"
    FLETCHER64 = "fletcher64"
    NONE = "none"


class ProgressMode(str, enum.Enum):
    """How a transport waits for completions: ``blocking`` sleeps on the transport's file descriptor when
    idle and spins only while operations are in flight; ``polling`` spins always (lowest latency, burns a
    core)."""

    BLOCKING = "blocking"
    POLLING = "polling"


class Compression(str, enum.Enum):
    """Lossless compression of chunk payloads on the wire."""

    NONE = "none"
    LZ4 = "lz4"
    ZSTD = "zstd"


def _enum(kind: type[enum.Enum]) -> Callable[[Any, str], Any]:
    def parse(value: Any, field: str) -> Any:
        if isinstance(value, kind):
            return value
        try:
            return kind(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(str(m.value) for m in kind)
            raise ConfigError(f"{field}={value!r} is not valid; choose one of {choices}") from None

    return parse


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{field}={value!r} is not an integer")
    try:
        return int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"{field}={value!r} is not an integer") from None


def _optional(parse: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    def wrapped(value: Any, field: str) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return parse(value, field)

    return wrapped


def _str(value: Any, field: str) -> str:
    text = str(value).strip()
    if not text:
        raise ConfigError(f"{field}={value!r} must not be empty")
    return text


class KVTransportConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of a :class:`~sage_transport.channel.KVTransferChannel`.

    ``peer_window`` is the per-peer window of unacknowledged chunks, ``max_inflight`` the channel-wide
    limit; ``gather`` packs short non-contiguous runs into one chunk (one staging copy per side) instead of
    sending one message per run; ``ack_timeout_s`` resends chunks whose acknowledgement is that late.
    ``map_peer_cache`` (sender side) writes a same-host peer that handed over its shared cache through a mapping
    of all of it (fastest: one compiled pass copies and checksums, but every page of the peer's cache is resident in
    this process's mapping too, so its RSS shows the peer's cache on top of its own); ``false`` writes it with
    ``process_vm_writev`` instead (CMA: slower, RSS stays this process's own). A mapping of only the pages being
    written costs more in page-table work than the copy itself on kernels without shared-memory huge pages.
    ``direct_placement`` lets a same-host sender write chunks straight into this side's registered memory
    (``send_lanes`` chunks at once) once a transfer is accepted; it needs ``zero_copy``. ``verify_placed``
    says who checks a placed chunk: ``writer`` (the sender copies each page and checksums it at the source and
    where it landed in the same pass, while both are in its cache; the receiver accepts the chunk when the two
    agree) or ``receiver`` (the receiver reads its pages back and compares them with the source checksum: one
    more pass over memory, for a receiver that wants its own reading). A writer is always a process the kernel
    attests as this user on this host, which already holds write access to the memory, so its reading
    protects against what the receiver's would (a faulty copy), short of our two sides disagreeing on offsets.
    ``send_lanes`` is also how many chunk sends a peer's writer keeps in flight on each of its connections.
    ``connections_per_peer`` (1..16, asked by the connecting side; 0, the default: the topology profile's choice
    for a remote peer, :func:`~sage_transport.hw.profile.connections_for_remote_peers`, and 1 for a peer on this
    host) opens that many connections to each peer it connects to, the session's own included: control messages
    and a transfer's first chunks keep to the first, the chunks of a transfer the peer has acknowledged go on
    whichever is least busy, each landing in place as on the first (several TCP streams for a long, fat link; host
    KV only: device KV keeps one).
    ``progress_mode``, ``ucx_tls``, ``listen_host``/``listen_port`` and the heartbeat settings configure
    the transport. ``ucx_tls``/``ucx_net_devices`` override the topology profile's UCX transports and
    devices, ``ucx_rndv_threshold`` UCX's eager→rendezvous switch (None: UCX decides); ``ucx_endpoint``
    picks the endpoint kind: ``local`` (worker address, no peer error handling: shared memory and CMA
    usable), ``remote`` (peer error handling, network transports only) or ``auto`` (local for a peer with
    this host's boot id). ``target_dtype`` quantises KV on the wire (``fp8_e4m3``, ``fp8_e5m2``, ``int8``, ``int4``;
    one scale per ``codec_group_size`` elements) and ``compression`` compresses it (``lz4``, ``zstd``);
    ``codec_policy=auto`` applies them only on links slower than the codec (never to a same-host peer),
    ``always`` on every link; ``accept_codecs`` is what this side accepts from senders (``all``, ``none`` or names
    joined by ``+``). ``allow_pull`` lets trusted peers ask for transfers of this side's registered KV
    (:meth:`~sage_transport.channel.KVTransferChannel.pull`, how vLLM and LMDeploy decode sides fetch KV);
    ``accept_push`` lets them send transfers this side did not ask for. ``fan_in_priority``: while a
    decode-critical transfer comes in from one peer, the others hold their bulk chunks (:mod:`.fan_in`). A peer
    is trusted when it proved
    ``auth_token`` (or ``auth_token_file``, a file only its owner may read) or, without a token, when the kernel
    attests it as a process of this user on this host. ``max_pending_handshakes`` bounds the connections a
    listener holds before they authenticate.
    ``kv_dtype`` is accepted as another name of ``target_dtype``, ``prefetch_depth`` of ``peer_window`` and
    ``overlap_streams`` of ``send_lanes`` (their names in 0.1: the window was never a prefetch, and there are no
    streams, only sends and placement jobs in flight). ``telemetry`` keeps
    chunk-latency and transfer-duration histograms (counters are always kept); ``metrics_host``/``metrics_port``
    are where a :class:`~sage_transport.telemetry.TelemetryServer` listens (port 0: any free one).
    """

    backend: str = "ucx"
    preset: str | None = None
    target_dtype: DType | None = None
    chunk_size: int = 4 << 20
    gather: bool = True
    send_lanes: int = 2
    connections_per_peer: int = 0
    peer_window: int = 8
    max_inflight: int = 64
    zero_copy: bool = True
    compression: Compression = Compression.NONE
    codec_policy: str = "always"
    codec_group_size: int = 128
    accept_codecs: str = "all"
    allow_pull: bool = True
    accept_push: bool = True
    fan_in_priority: bool = True
    integrity: Integrity = Integrity.XXH3
    max_retries: int = 3
    connect_timeout_s: float = 10.0
    transfer_timeout_s: float | None = None
    ack_timeout_s: float = 5.0
    auth_token: str | None = None
    auth_token_file: str | None = None
    max_pending_handshakes: int = 256
    direct_placement: bool = True
    map_peer_cache: bool = True
    verify_placed: str = "writer"
    progress_mode: ProgressMode = ProgressMode.BLOCKING
    ucx_tls: str | None = None
    ucx_net_devices: str | None = None
    ucx_rndv_threshold: int | None = None
    ucx_endpoint: str = "auto"
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 10.0
    telemetry: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        for name, low, high in (
            ("chunk_size", 512, 1 << 30),
            ("send_lanes", 1, 64),
            ("connections_per_peer", 0, 16),
            ("peer_window", 1, 4096),
            ("max_inflight", 1, 1 << 16),
            ("max_retries", 0, 100),
            ("listen_port", 0, 65535),
            ("codec_group_size", 2, 1 << 20),
            ("max_pending_handshakes", 1, 1 << 16),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name}={value!r} must be an integer in {low}..{high}")
        for name in ("connect_timeout_s", "ack_timeout_s", "transfer_timeout_s", "heartbeat_interval_s", "peer_timeout_s"):
            value = getattr(self, name)
            if value is None and name == "transfer_timeout_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive number of seconds")
        if self.target_dtype is not None:
            msgspec.structs.force_setattr(self, "target_dtype", DType.parse(self.target_dtype, "target_dtype"))
        if self.peer_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"peer_timeout_s={self.peer_timeout_s!r} must exceed heartbeat_interval_s={self.heartbeat_interval_s!r}"
            )
        for name, kind in (("integrity", Integrity), ("compression", Compression), ("progress_mode", ProgressMode)):
            msgspec.structs.force_setattr(self, name, _enum(kind)(getattr(self, name), name))
        if self.metrics_port is not None and (
            isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int) or not 0 <= self.metrics_port <= 65535
        ):
            raise ConfigError(f"metrics_port={self.metrics_port!r} must be an integer in 0..65535")
        if self.codec_policy not in ("always", "auto"):
            raise ConfigError(f"codec_policy={self.codec_policy!r} is not valid; choose one of always, auto")
        if self.codec_group_size % 2:
            raise ConfigError(f"codec_group_size={self.codec_group_size!r} must be even (int4 packs two per byte)")
        msgspec.structs.force_setattr(self, "accept_codecs", _codec_list(self.accept_codecs, "accept_codecs"))
        if self.verify_placed not in ("writer", "receiver"):
            raise ConfigError(f"verify_placed={self.verify_placed!r} is not valid; choose one of writer, receiver")
        if self.ucx_endpoint not in ("auto", "local", "remote"):
            raise ConfigError(f"ucx_endpoint={self.ucx_endpoint!r} is not valid; choose one of auto, local, remote")
        if self.ucx_rndv_threshold is not None and (
            isinstance(self.ucx_rndv_threshold, bool)
            or not isinstance(self.ucx_rndv_threshold, int)
            or self.ucx_rndv_threshold < 0
        ):
            raise ConfigError(f"ucx_rndv_threshold={self.ucx_rndv_threshold!r} must be a size in bytes")
        if self.auth_token_file is not None:
            if self.auth_token is not None:
                raise ConfigError(f"auth_token_file={self.auth_token_file!r}: give auth_token or auth_token_file, not both")
            msgspec.structs.force_setattr(self, "auth_token", read_token_file(self.auth_token_file))
            msgspec.structs.force_setattr(self, "auth_token_file", None)  # read once: the token is what counts
        if self.auth_token is not None:
            check_token_strength(self.auth_token, "auth_token")

    @property
    def prefetch_depth(self) -> int:
        """The name :attr:`peer_window` had in 0.1 (read-only; as a key it is still accepted)."""
        return self.peer_window

    @property
    def overlap_streams(self) -> int:
        """The name :attr:`send_lanes` had in 0.1 (read-only; as a key it is still accepted)."""
        return self.send_lanes

    def __repr__(self) -> str:
        shown = {f: getattr(self, f) for f in self.__struct_fields__ if f != "auth_token"}
        shown["auth_token"] = None if self.auth_token is None else "***"
        return "KVTransportConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    # ---- building -------------------------------------------------------------------------------------

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, source: str = "mapping", base: KVTransportConfig | None = None
    ) -> KVTransportConfig:
        """Apply ``values`` (strings or typed values) on top of ``base`` (default: defaults)."""
        fields = msgspec.structs.asdict(base) if base is not None else {}
        for raw_key, raw_value in values.items():
            key = canonical_key(raw_key)
            parse = _PARSERS.get(key)
            if parse is None:
                hint = difflib.get_close_matches(key, list(_PARSERS), n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"unknown key {raw_key!r} in {source}{suggestion}; known keys: {', '.join(_PARSERS)}")
            try:
                fields[key] = parse(raw_value, key)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in {source})") from None
        try:
            return cls(**fields)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {source})") from None

    @classmethod
    def from_string(cls, spec: str, *, base: KVTransportConfig | None = None) -> KVTransportConfig:
        """Parse ``"preset=high-bw,chunk_size=8MiB"`` (a named preset is applied first)."""
        return cls.resolve(spec, env={}, base=base)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KVTransportConfig:
        """Read ``SAGE_TRANSPORT_<KEY>`` variables (``SAGE_TRANSPORT_CHUNK_SIZE=8MiB``)."""
        return cls.resolve(None, env=os.environ if env is None else env)

    @classmethod
    def resolve(
        cls,
        spec: str | Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        base: KVTransportConfig | None = None,
        presets: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> KVTransportConfig:
        """defaults < preset < environment < ``spec``; ``presets`` defaults to the shipped preset file."""
        explicit = _split_spec(spec) if isinstance(spec, str) else dict(spec or {})
        env = os.environ if env is None else env
        from_env = {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        preset_name = explicit.get("preset", from_env.get("preset", base.preset if base else None))
        config = base
        if preset_name:
            if presets is None:
                from .presets import load_presets

                presets = {name: p.settings for name, p in load_presets().items()}
            if preset_name not in presets:
                raise ConfigError(f"preset={preset_name!r} is not defined; known presets: {', '.join(sorted(presets))}")
            config = cls.from_mapping(
                {**presets[preset_name], "preset": preset_name}, source=f"preset {preset_name!r}", base=config
            )
        if from_env:
            config = cls.from_mapping(from_env, source="environment (SAGE_TRANSPORT_*)", base=config)
        if explicit:
            config = cls.from_mapping(
                explicit, source="the configuration string" if isinstance(spec, str) else "the mapping", base=config
            )
        return config if config is not None else cls()

    def replace(self, **changes: Any) -> KVTransportConfig:
        """A copy with ``changes`` applied and validated."""
        return self.from_mapping(changes, source="replace()", base=self)


def _split_spec(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"configuration item {item!r} is not key=value (in {spec!r})")
        out[key.strip()] = value.strip()
    return out


#: Other names engines use for a key (vLLM's and sageLLM's ``--kv-dtype``).
#: other names a key is accepted by (in strings, mappings, presets, the environment, ``replace`` and ``reconfigure``):
#: ``prefetch_depth`` and ``overlap_streams`` are the names ``peer_window`` and ``send_lanes`` had in 0.1
KEY_ALIASES = {"kv_dtype": "target_dtype", "prefetch_depth": "peer_window", "overlap_streams": "send_lanes"}


def canonical_key(key: str) -> str:
    """The setting ``key`` names: lower case, ``-`` as ``_``, an alias (:data:`KEY_ALIASES`) as its field."""
    key = str(key).strip().lower().replace("-", "_")
    return KEY_ALIASES.get(key, key)


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "backend": _str,
    "preset": _optional(_str),
    "target_dtype": _optional(lambda v, f: DType.parse(v, f)),
    "chunk_size": parse_size,
    "gather": parse_bool,
    "send_lanes": _int,
    "connections_per_peer": _int,
    "peer_window": _int,
    "max_inflight": _int,
    "zero_copy": parse_bool,
    "compression": _enum(Compression),
    "codec_policy": lambda v, f: _str(v, f).lower(),
    "codec_group_size": _int,
    "accept_codecs": lambda v, f: _codec_list(v, f),
    "allow_pull": parse_bool,
    "integrity": _enum(Integrity),
    "max_retries": _int,
    "connect_timeout_s": parse_duration,
    "transfer_timeout_s": _optional(parse_duration),
    "ack_timeout_s": parse_duration,
    "auth_token": _optional(_str),
    "auth_token_file": _optional(_str),
    "max_pending_handshakes": _int,
    "accept_push": parse_bool,
    "fan_in_priority": parse_bool,
    "direct_placement": parse_bool,
    "map_peer_cache": parse_bool,
    "verify_placed": lambda v, f: _str(v, f).lower(),
    "progress_mode": _enum(ProgressMode),
    "ucx_tls": _optional(_str),
    "ucx_net_devices": _optional(_str),
    "ucx_rndv_threshold": _optional(parse_size),
    "ucx_endpoint": lambda v, f: _str(v, f).lower(),
    "listen_host": _str,
    "listen_port": _int,
    "heartbeat_interval_s": parse_duration,
    "peer_timeout_s": parse_duration,
    "telemetry": parse_bool,
    "metrics_host": _str,
    "metrics_port": _optional(_int),
}


#: Codecs a receiver may accept (``accept_codecs``): quantised wire dtypes and lossless compressions.
CODEC_NAMES = ("fp8_e4m3", "fp8_e5m2", "int8", "int4", "lz4", "zstd")


def _codec_list(value: Any, field: str) -> str:
    """``all``, ``none`` or a ``+``/space-separated subset of :data:`CODEC_NAMES` (normalised, sorted)."""
    text = str(value).strip().lower()
    if text in ("all", "none"):
        return text
    names = sorted({n for n in text.replace("+", " ").replace(";", " ").split() if n})
    unknown = [n for n in names if n not in CODEC_NAMES]
    if unknown or not names:
        raise ConfigError(f"{field}={value!r} is not valid; use all, none or names from {', '.join(CODEC_NAMES)} joined by +")
    return "+".join(names)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    bare = host.strip("[]").split("%", 1)[0]  # [::1], fe80::1%eth0
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def require_token_off_loopback(host: str, auth_token: str | None, what: str = "listen_host") -> None:
    """Refuse to accept connections beyond this machine without a shared token: every peer must prove it."""
    if auth_token is None and not is_loopback(host):
        raise ConfigError(
            f"{what}={host!r} is not a loopback address: set auth_token (SAGE_TRANSPORT_AUTH_TOKEN) so that every "
            "peer must prove the shared token before anything is exchanged"
        )


#: The least estimated entropy of an ``auth_token``: HMAC proofs travel before the peer is known (a listener
#: shows any client a proof over a nonce the client chose), so a weak token can be searched for offline.
MIN_TOKEN_BITS = 128


def token_strength_bits(token: str) -> float:
    """An upper estimate of a token's entropy: its length times log2 of the alphabet its character classes span
    (lower case, upper case, digits, other), counting each distinct character at most four times (``aaaa...``
    and ``abababab...`` are weak whatever their length)."""
    classes = [
        any(c.islower() for c in token) * 26,
        any(c.isupper() for c in token) * 26,
        any(c.isdigit() for c in token) * 10,
        any(not c.isalnum() for c in token) * 33,
    ]
    alphabet = max(2, sum(classes))
    counts: dict[str, int] = {}
    for c in token:
        counts[c] = counts.get(c, 0) + 1
    effective = sum(min(n, 4) for n in counts.values())
    return effective * math.log2(alphabet)


def check_token_strength(token: str, field: str = "auth_token") -> None:
    """Refuse a token of under :data:`MIN_TOKEN_BITS` estimated bits (the value is never shown)."""
    bits = token_strength_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise ConfigError(
            f"{field} is too weak: about {bits:.0f} bits of entropy, at least {MIN_TOKEN_BITS} needed (value hidden); "
            "generate one with `sage-transport token` (32 random bytes, URL-safe base64)"
        )


def generate_token() -> str:
    """A fresh token: 32 random bytes as URL-safe base64 (43 characters, 256 bits)."""
    import secrets

    return secrets.token_urlsafe(32)


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace stripped). The file must be readable by its owner only
    (mode 0600 or 0400), as ssh requires of a private key."""
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"auth_token_file={path!r} cannot be read: {exc.strerror or exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"auth_token_file={path!r} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 {path}"
        )
    if not token:
        raise ConfigError(f"auth_token_file={path!r} is empty")
    return token
