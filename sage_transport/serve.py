"""The receiving side of the main job (``sage-transport serve``).

A serve process listens on a *job* port. It opens each job connection with a :class:`JobChallenge` (a
nonce); a migrating sender answers with a :class:`JobSpec` carrying ``proof``, an HMAC of the nonce under the
shared ``auth_token`` (``SAGE_TRANSPORT_AUTH_TOKEN`` on both sides; the token itself never travels). A serve
bound to anything but loopback refuses to start without a token, and the channel it opens uses its own token,
never one a client sends. The :class:`JobSpec` holds
the model shape, tokens, transport, settings and transfer ids; the receiver allocates and pre-touches the
destination KV cache, opens a channel on that transport and answers :class:`JobReady` with the channel's
address. After each transfer it reports a digest of its whole cache (:class:`JobReceived`), so the
sender checks end to end what per-chunk checksums already checked piece by piece. The same code runs
locally (``migrate`` starts one serve process per receiver) and across hosts (``migrate --peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import resource
import secrets
from typing import Any

import msgspec
import structlog

from .channel import KVTransferChannel
from .config import KVTransportConfig, require_token_off_loopback
from .errors import AuthError, ConfigError, PeerDeadError, ProtocolError, SageTransportError
from .memory import KVMemory
from .schema import KVCacheSchema, Layout
from .telemetry.trace import ChunkTracer
from .wire_codec import local_codecs

__all__ = [
    "JobChallenge",
    "JobDone",
    "JobReady",
    "JobReceived",
    "JobSpec",
    "cache_digest",
    "cpu_seconds",
    "job_proof",
    "serve",
    "trust_line",
]

log = structlog.get_logger("sage_transport.serve")

JOB_PROTOCOL = 2


class JobChallenge(msgspec.Struct, frozen=True, tag="challenge", kw_only=True):
    """Receiver → sender, first: the nonce the sender proves the shared token on."""

    protocol: int = JOB_PROTOCOL
    nonce: str


def job_proof(auth_token: str | None, nonce: str) -> str:
    """The sender's answer to a :class:`JobChallenge` (empty without a token)."""
    if auth_token is None:
        return ""
    return hmac.new(auth_token.encode(), b"sage-transport job\0" + nonce.encode(), hashlib.sha256).hexdigest()


class JobSpec(msgspec.Struct, frozen=True, tag="job", kw_only=True):
    """Sender → receiver: the cache to build (model shape, tokens, block size), the transport and settings of
    the channel to open, and the transfer ids to wait for."""

    protocol: int = JOB_PROTOCOL
    model: str
    tokens: int
    block_size: int
    transport: str
    config: dict[str, Any]
    transfer_ids: list[str]
    trace: bool = False  # record chunk events and return them in JobBye
    proof: str = ""  # job_proof(auth_token, the challenge's nonce)


class JobReady(msgspec.Struct, frozen=True, tag="ready", kw_only=True):
    """Receiver → sender: the destination cache exists (pre-touched) and the channel listens here."""

    channel_address: str
    blocks: int
    bytes: int


class JobReceived(msgspec.Struct, frozen=True, tag="received", kw_only=True):
    """Receiver → sender: a transfer arrived verified; ``digest`` is xxh3-64 of the whole destination cache."""

    transfer_id: str
    digest: int
    integrity: str
    receive_seconds: float


class JobDone(msgspec.Struct, frozen=True, tag="done"):
    """Sender → receiver: no more transfers; report and release the cache."""


class JobBye(msgspec.Struct, frozen=True, tag="bye", kw_only=True):
    """Receiver → sender: CPU seconds spent receiving and the UCX transports its side used."""

    cpu_seconds: float
    ucx_transports: dict[str, list[str]]
    trace: dict[str, Any] | None = None  # ChunkTracer.export() when the job asked for a trace
    peak_rss: int = 0  # the receiver process's peak resident set, bytes (getrusage)


class JobFailed(msgspec.Struct, frozen=True, tag="failed", kw_only=True):
    """Receiver → sender: the job failed here (the sender raises it)."""

    reason: str


JobMessage = JobChallenge | JobSpec | JobReady | JobReceived | JobDone | JobBye | JobFailed
_decoder = msgspec.json.Decoder(JobMessage)


async def send_job_message(writer: asyncio.StreamWriter, message: Any) -> None:
    writer.write(msgspec.json.encode(message) + b"\n")
    await writer.drain()


async def read_job_message(reader: asyncio.StreamReader, timeout_s: float | None = None, waiting_for: str = "") -> Any:
    """The next job message; a :class:`PeerDeadError` saying what was awaited when none comes in ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            line = await reader.readline()
    except TimeoutError:
        what = waiting_for or "its next job message"
        raise PeerDeadError(f"the job peer sent no {what} within {timeout_s:g} s") from None
    except ValueError as exc:  # a line longer than the stream's limit: not a job peer
        raise ProtocolError(f"the job peer sent a line too long for a job message ({exc})") from None
    if not line:
        raise ProtocolError("the job peer hung up")
    try:
        message = _decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed job message: {exc}") from exc
    if isinstance(message, JobFailed):
        raise SageTransportError(f"the receiver failed: {message.reason}")
    return message


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_seconds() -> float:
    """User plus system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cache_digest(memory: KVMemory) -> int:
    """xxh3-64 of the cache's bytes, buffer by buffer, in layout order."""
    import xxhash

    h = xxhash.xxh3_64()
    for buf in memory.buffers:
        h.update(memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf)
    return int(h.intdigest())


def job_schema(spec: JobSpec) -> KVCacheSchema:
    return KVCacheSchema.for_model(spec.model, block_size=spec.block_size, layout=Layout.LAYER_KV_BLOCK)


async def _run_job(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, auth_token: str | None) -> None:
    nonce = secrets.token_hex(16)
    await send_job_message(writer, JobChallenge(nonce=nonce))
    spec = await read_job_message(reader, 30)
    if not isinstance(spec, JobSpec) or spec.protocol != JOB_PROTOCOL:
        raise ProtocolError(f"expected a job spec of protocol {JOB_PROTOCOL}, got {type(spec).__name__}")
    if auth_token is not None and not hmac.compare_digest(spec.proof, job_proof(auth_token, nonce)):
        raise AuthError("job rejected: the sender did not prove the shared auth_token")
    schema = job_schema(spec)
    blocks = schema.blocks_for_tokens(spec.tokens)
    # never a client's token (nor a token file it names: it would choose who is trusted here)
    settings = {k: v for k, v in spec.config.items() if k not in ("auth_token", "auth_token_file")}
    config = KVTransportConfig.resolve({**settings, "listen_host": host, "auth_token": auth_token}, env={})
    # touched (a live KV cache has its pages) and shared, so a same-host sender can place chunks by memory copy
    memory = KVMemory.allocate(schema, blocks, fill=0x5A, shared=True)
    if config.target_dtype is not None and config.target_dtype != schema.dtype and "int4" in local_codecs():
        import sage_transport.codec  # noqa: F401  (torch loads now, not inside the first timed transfer)
    async with KVTransferChannel(spec.transport, config, name=f"decode-{id(writer):x}") as channel:
        channel.register(memory)
        address = await channel.listen()
        if spec.trace:
            channel.tracer = ChunkTracer(f"receiver {address}")
        await send_job_message(writer, JobReady(channel_address=address, blocks=blocks, bytes=blocks * schema.bytes_per_block))
        busy = 0.0
        for transfer_id in spec.transfer_ids:
            start_cpu = cpu_seconds()
            result = await channel.wait_received(transfer_id)
            busy += cpu_seconds() - start_cpu
            digest = cache_digest(memory)
            await send_job_message(
                writer,
                JobReceived(
                    transfer_id=transfer_id, digest=digest, integrity=result.integrity.value, receive_seconds=result.wall_s
                ),
            )
        done = await read_job_message(reader)
        if not isinstance(done, JobDone):
            raise ProtocolError(f"expected done, got {done!r}")
        transports: dict[str, list[str]] = {}
        for info in channel.links().values():
            transports.update(info.get("ucx_transports", {}))
        trace = channel.tracer.export() if channel.tracer is not None else None
        await send_job_message(writer, JobBye(cpu_seconds=busy, ucx_transports=transports, trace=trace, peak_rss=peak_rss()))


def trust_line(auth_token: str | None) -> str:
    """Who may send KV to (or pull it from) this process, as ``serve`` says when it starts."""
    if auth_token is not None:
        return "peers must prove the shared auth_token (HMAC challenge); only they may push, pull or write directly"
    return (
        "no auth_token: only processes of this user on this host (attested by the kernel) may push, pull or write "
        "directly; set SAGE_TRANSPORT_AUTH_TOKEN or SAGE_TRANSPORT_AUTH_TOKEN_FILE (`sage-transport token`) in every "
        "deployment"
    )


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    once: bool = False,
    ready: Any = None,
    auth_token: str | None = None,
    store: str | None = None,
    name: str | None = None,
    advertise: str | None = None,
    ttl_s: float = 10.0,
) -> None:
    """Serve migration jobs on ``host:port`` until cancelled (``once``: after the first job). Senders must prove
    ``auth_token``; a ``host`` other than loopback requires one (:class:`~sage_transport.errors.ConfigError`).
    ``store`` (``etcd://`` or ``tcpstore://``): register the job address there as ``name`` (default
    ``serve-HOST-PORT``) under :data:`~sage_transport.rendezvous.SERVE_PREFIX`, kept alive while serving;
    ``advertise`` is the host peers reach it at (required with a wildcard ``host``)."""
    require_token_off_loopback(host, auth_token, "serve --host")
    if store is not None and advertise is None and host in ("0.0.0.0", "::", ""):
        raise ConfigError(f"serve --host={host!r} with --store needs --advertise HOST: the address peers reach it at")
    finished = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _run_job(reader, writer, host, auth_token)
        except Exception as exc:
            log.warning("job_failed", error=str(exc))
            with contextlib.suppress(Exception):
                await send_job_message(writer, JobFailed(reason=f"{type(exc).__name__}: {exc}"))
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if once:
                finished.set()

    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()
    address = f"{bound[0]}:{bound[1]}"
    registration = None
    try:
        if store is not None:
            from .rendezvous import SERVE_PREFIX, open_store, register

            reachable = f"{advertise or bound[0]}:{bound[1]}"
            member = name or f"serve-{advertise or bound[0]}-{bound[1]}"
            registration = await register(open_store(store), member, reachable, ttl_s=ttl_s, prefix=SERVE_PREFIX)
        if ready is not None:
            ready(address)
        else:
            print(f"sage-transport serve: listening on {address}", flush=True)
            if registration is not None:
                print(f"sage-transport serve: registered as {registration.name} in {store}", flush=True)
            print(f"sage-transport serve: {trust_line(auth_token)}", flush=True)
        if once:
            await finished.wait()
        else:
            await server.serve_forever()
    finally:
        server.close()  # not wait_closed(): from Python 3.12 it would wait for the job connections too
        if registration is not None:
            await registration.withdraw()
            await registration.store.close()
