"""LMDeploy PD-disaggregation migration backend over sage_transport: the decode engine pulls the prefill's KV.

LMDeploy's PyTorch engine picks a migration backend by name from ``MIGRATION_BACKENDS``, and its
``MigrationBackend`` enum only knows ``DLSlime`` and ``Mooncake``. Importing this module registers
:class:`SageMigrationBackend` under a name of its own, ``SageTransport``, added to that enum and to the CLI's
``--migration-backend`` choices (:mod:`.lmdeploy_hooks`); ``SAGE_TRANSPORT_LMDEPLOY_AS=DLSlime`` (or ``Mooncake``)
takes one of LMDeploy's names instead, and naming one whose engine is installed is refused unless
``SAGE_TRANSPORT_LMDEPLOY_REPLACE=1``. :data:`REGISTERED_AS` says which name was taken. Importing it also makes a
failed migration fail its request alone (an ``INTERNAL_ENGINE_ERROR`` naming the cause) instead of ending LMDeploy's
migration loop. Launch either engine through this module, so that LMDeploy's spawned worker processes import it
too::

    python -m sage_transport.integrations.lmdeploy serve api_server MODEL --backend pytorch \\
        --role Decode --migration-backend SageTransport

(or ``import sage_transport.integrations.lmdeploy`` at the top of your own launch script).

How it moves KV: LMDeploy hands every backend each cache pool as a raw memory region (address, length) and, per
request, a batch of byte assignments ``(mr_key, target_offset, source_offset, length)``: bytes at
``target_offset`` in the remote (prefill) pool go to ``source_offset`` in the local (decode) pool.
:class:`SageMigrationBackend` registers each pool with a :class:`~sage_transport.channel.KVTransferChannel` of its
own, as a KV cache of ``rows`` layers with one page per (row, block) entry (the pool shapes travel in LMDeploy's
``cache_pools`` metadata), coalesces adjacent assignments, turns them into block mappings and pulls them
(:meth:`~sage_transport.channel.KVTransferChannel.pull`, decode-critical priority). Pools are moved as bytes: they
hold K, V and any scales together, so the wire codec never quantises them (lossless compression still applies).
Pools in device memory (LMDeploy 0.18 allocates them on the GPU) are registered as device KV (CUDA asks the
pointer's memory type): they move on the device (:mod:`sage_transport.device`: fletcher64 checksums there, UCX
``cuda_copy``/``cuda_ipc`` or pinned staging, CUDA IPC placement on one host); host pools as host KV. The CPU
tests run LMDeploy's ``CacheEngine`` over CPU pools; the GPU tests over its CUDA pools.

Settings come from ``SAGE_TRANSPORT_*`` variables (:meth:`KVTransportConfig.resolve`): ``listen_host`` (an address
other than loopback needs ``auth_token``), ``listen_port`` (pool ``i`` listens on ``listen_port + i``; 0: any free
port). The addresses travel in LMDeploy's endpoint info; none is hard-coded.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import json
import math
import os
import sys
import uuid
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..errors import ConfigError, PlanError
from ..memory import KVMemory
from ..plan import BlockMapping, Priority, TransferPlan
from ..schema import DType, KVCacheSchema, Layout
from .loop_thread import shared_loop

try:
    from lmdeploy.pytorch.disagg.backend.base import MigrationBackendImpl

    LMDEPLOY_AVAILABLE = True
except ImportError:  # importable without LMDeploy: the backend itself needs it
    LMDEPLOY_AVAILABLE = False
    MigrationBackendImpl = object  # type: ignore[assignment,misc]

__all__ = [
    "LMDEPLOY_AVAILABLE",
    "REGISTERED_AS",
    "ByteRun",
    "PoolGeometry",
    "SageMigrationBackend",
    "coalesce",
    "register",
    "runs_to_mappings",
]

ENDPOINT_KIND = "sage_transport/1"
_ENGINE_MODULES = {"DLSlime": "dlslime", "Mooncake": "mooncake.engine"}


class ByteRun(NamedTuple):
    """``length`` bytes from ``remote_offset`` in the peer's pool ``mr_key`` to ``local_offset`` in ours."""

    mr_key: int
    local_offset: int
    remote_offset: int
    length: int


class PoolGeometry(NamedTuple):
    """A pool as LMDeploy lays it out: ``rows`` × ``entries`` pages of ``page_bytes`` (entry = one block)."""

    rows: int
    entries: int
    page_bytes: int

    @classmethod
    def from_info(cls, info: Any) -> PoolGeometry:
        """From a ``DistServeCachePoolInfo`` (``shape``, ``element_size``, ``entry_axis``)."""
        shape, axis = tuple(int(d) for d in info.shape), int(info.entry_axis)
        if not 0 <= axis < len(shape):
            raise ConfigError(f"cache pool entry_axis={axis} is outside shape {shape}")
        page = math.prod(shape[axis + 1 :]) * int(info.element_size)
        if page <= 0 or shape[axis] <= 0:
            raise ConfigError(f"cache pool of shape {shape} (entry_axis={axis}) has no payload to move")
        return cls(math.prod(shape[:axis]), shape[axis], page)

    @property
    def nbytes(self) -> int:
        return self.rows * self.entries * self.page_bytes

    def schema(self) -> KVCacheSchema:
        """The pool as a sage_transport KV cache: ``rows`` layers, one plane, pages of ``page_bytes`` raw bytes."""
        head_dim = math.gcd(self.page_bytes, 1 << 16)
        return KVCacheSchema(
            num_layers=self.rows, num_kv_heads=1, head_dim=head_dim, block_size=self.page_bytes // head_dim,
            dtype=DType.INT8, layout=Layout.LAYER_KV_BLOCK, kv_planes=1,
        )  # fmt: skip


def coalesce(batch: Iterable[Any]) -> list[ByteRun]:
    """LMDeploy's assignments (``mr_key``, ``target_offset`` remote, ``source_offset`` local, ``length``) merged into
    maximal runs: sorted by pool and local offset, an entry that continues the previous one on both sides joins it."""
    entries = sorted((int(a.mr_key), int(a.source_offset), int(a.target_offset), int(a.length)) for a in batch)
    runs: list[ByteRun] = []
    for key, local, remote, length in entries:
        if length < 0 or local < 0 or remote < 0:
            raise PlanError(f"assignment mr_key={key} source_offset={local} target_offset={remote} length={length} is negative")
        if not length:
            continue
        if runs:
            last = runs[-1]
            if last.mr_key == key and local < last.local_offset + last.length:
                raise PlanError(f"assignments overlap in local pool {key} at byte {local}: two sources for one destination")
            if last.mr_key == key and last.local_offset + last.length == local and last.remote_offset + last.length == remote:
                runs[-1] = last._replace(length=last.length + length)
                continue
        runs.append(ByteRun(key, local, remote, length))
    return runs


def runs_to_mappings(runs: Sequence[ByteRun], local: PoolGeometry, remote: PoolGeometry) -> tuple[BlockMapping, ...]:
    """Byte runs of one pool as block mappings (the peer's pages → ours), one mapping per set of rows that move the
    same blocks. A run must start and end on page boundaries and stay in one row on both sides."""
    page = local.page_bytes
    if remote.page_bytes != page or remote.rows != local.rows:
        raise PlanError(
            f"pool pages differ: {local.rows} rows × {page} B here, {remote.rows} × {remote.page_bytes} B at the peer"
        )
    by_row: dict[int, tuple[list[int], list[int]]] = {}
    for run in runs:
        if run.local_offset % page or run.remote_offset % page or run.length % page:
            raise PlanError(
                f"assignment in pool {run.mr_key} (local offset {run.local_offset}, remote offset {run.remote_offset}, "
                f"length {run.length}) does not fall on its {page}-byte pages"
            )
        local_page, remote_page = run.local_offset // page, run.remote_offset // page
        for step in range(run.length // page):
            row, dst = divmod(local_page + step, local.entries)
            remote_row, src = divmod(remote_page + step, remote.entries)
            if row != remote_row or row >= local.rows:
                raise PlanError(
                    f"assignment in pool {run.mr_key} maps row {remote_row} of the peer's pool to row {row} of ours "
                    f"(local offset {run.local_offset + step * page}): rows must match"
                )
            srcs, dsts = by_row.setdefault(row, ([], []))
            srcs.append(src)
            dsts.append(dst)
    mappings: list[BlockMapping] = []
    start = prev = -1
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    for row in sorted(by_row):
        pair = (tuple(by_row[row][0]), tuple(by_row[row][1]))
        if row == prev + 1 and pair == blocks:
            prev = row
            continue
        if start >= 0:
            mappings.append(BlockMapping(start, prev + 1, *blocks))
        start = prev = row
        blocks = pair
    if start >= 0:
        mappings.append(BlockMapping(start, prev + 1, *blocks))
    return tuple(mappings)


def _is_device_pointer(address: int) -> bool:
    """Whether CUDA says ``address`` is device memory (``False`` where no CUDA driver is loaded)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    if cuda.cuInit(0) != 0:
        return False
    memory_type = ctypes.c_uint(0)
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_MEMORYTYPE_DEVICE = 2, 2
    status = cuda.cuPointerGetAttribute(ctypes.byref(memory_type), CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ctypes.c_void_p(address))
    return status == 0 and memory_type.value == CU_MEMORYTYPE_DEVICE


class _Pool:
    """One registered pool: its region, its channel and (once a peer's metadata came) its geometry."""

    def __init__(self, mr_key: int, address: int, length: int) -> None:
        self.mr_key, self.address, self.length = mr_key, address, length
        self.channel: KVTransferChannel | None = None
        self.listen_address = ""
        self.geometry: PoolGeometry | None = None
        self.on_device = False  # a CUDA pool: registered as device KV

    def buffer(self) -> Any:
        """The pool's bytes without a copy: a uint8 CUDA tensor over device memory, or a ctypes array."""
        if self.on_device:
            import torch

            from ..device.ipc import device_range

            return torch.as_tensor(device_range(self.address, self.length))
        return (ctypes.c_ubyte * self.length).from_address(self.address)


class _Link:
    """What LMDeploy keeps per remote engine (``links[remote_engine_id]``): the init request's engine configs,
    the peer's endpoint, and the peer name each pool's channel knows it by."""

    def __init__(self, init_request: Any) -> None:
        self.rank = int(init_request.rank or 0)
        self.local_engine_id = str(init_request.local_engine_id)
        self.remote_engine_id = str(init_request.remote_engine_id)
        self.local_engine_config = init_request.local_engine_config
        self.remote_engine_config = init_request.remote_engine_config
        self.protocol = init_request.protocol
        self.remote_addresses: dict[int, str] = {}
        self.remote_geometry: dict[int, PoolGeometry] = {}
        self.peers: dict[int, str] = {}


class SageMigrationBackend(MigrationBackendImpl):  # type: ignore[misc]
    """An LMDeploy ``MigrationBackendImpl`` moving KV with one :class:`KVTransferChannel` per cache pool (see the
    module docstring). ``config`` defaults to ``SAGE_TRANSPORT_*`` settings."""

    def __init__(self, config: KVTransportConfig | str | None = None) -> None:
        base = config if isinstance(config, KVTransportConfig) else KVTransportConfig.resolve(config or "")
        self.config = base.replace(target_dtype=None)  # pools are raw bytes (K, V, scales): never quantised
        self.links: dict[str, _Link] = {}
        self._pools: dict[int, _Pool] = {}
        self._loop = shared_loop()
        self._name = f"lmdeploy-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # ---- LMDeploy's interface -------------------------------------------------------------------------

    def p2p_initialize(self, init_request: Any) -> None:
        """Start a link to ``init_request.remote_engine_id`` (its engine configs are kept for LMDeploy)."""
        self.links[str(init_request.remote_engine_id)] = _Link(init_request)

    def register_memory_region(self, register_mr_request: Any) -> None:
        """Register pool ``mr_key`` (``addr``, ``length`` bytes of host memory) once, and listen for its peers."""
        key, address, length = int(register_mr_request.mr_key), int(register_mr_request.addr), int(register_mr_request.length)
        self._link(register_mr_request.remote_engine_id)
        pool = self._pools.get(key)
        if pool is not None:
            if (pool.address, pool.length) != (address, length):
                raise ConfigError(
                    f"memory region mr_key={key} re-registered at {address:#x}+{length}, it was {pool.address:#x}+{pool.length}"
                )
            return
        if length <= 0:
            raise ConfigError(f"memory region mr_key={key} has length={length}")
        pool = _Pool(key, address, length)
        pool.on_device = _is_device_pointer(address)
        port = self.config.listen_port + len(self._pools) if self.config.listen_port else 0
        self._loop.call(self._open_pool(pool, port), timeout=self.config.connect_timeout_s + 30)
        self._pools[key] = pool

    async def _open_pool(self, pool: _Pool, port: int) -> None:
        channel = KVTransferChannel(None, self.config, name=f"{self._name}-mr{pool.mr_key}")
        await channel.__aenter__()
        try:
            pool.listen_address = await channel.listen(f"{self.config.listen_host}:{port}" if port else None)
        except BaseException:
            await channel.aclose()
            raise
        pool.channel = channel

    def endpoint_info(self, remote_engine_id: str, protocol: Any) -> dict[str, Any]:
        """What the peer needs to pull from us: each pool's channel address and length (LMDeploy JSON-encodes it)."""
        self._link(remote_engine_id)
        return {
            "kind": ENDPOINT_KIND,
            "pools": {str(k): {"address": p.listen_address, "length": p.length} for k, p in self._pools.items()},
        }

    def p2p_connect(self, remote_engine_id: str, conn_req: Any) -> None:
        """Take the peer's endpoint and pool shapes; register each pool's memory with its channel (first link only)."""
        link = self._link(remote_engine_id)
        try:
            info = json.loads(conn_req.endpoint_info)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"endpoint_info from {remote_engine_id!r} is not JSON: {exc}") from None
        kind = info.get("kind") if isinstance(info, dict) else None
        if kind != ENDPOINT_KIND:
            raise ConfigError(
                f"endpoint_info from {remote_engine_id!r} is not a sage_transport endpoint (kind={kind!r}): "
                "both engines must run SageMigrationBackend"
            )
        pools = getattr(conn_req, "cache_pools", None)
        if not pools:
            raise ConfigError(f"engine {remote_engine_id!r} sent no cache_pools metadata (LMDeploy 0.18 or later sends it)")
        remote = {int(k): v for k, v in info.get("pools", {}).items()}
        if sorted(remote) != sorted(self._pools):
            raise ConfigError(f"engine {remote_engine_id!r} has pools {sorted(remote)}, this engine {sorted(self._pools)}")
        for key, pool in self._pools.items():
            if key >= len(pools):
                raise ConfigError(f"engine {remote_engine_id!r} describes {len(pools)} cache pools, none for mr_key={key}")
            geometry = PoolGeometry.from_info(pools[key])
            local = PoolGeometry(geometry.rows, pool.length // (geometry.rows * geometry.page_bytes), geometry.page_bytes)
            if local.nbytes != pool.length:
                raise ConfigError(
                    f"pool mr_key={key}: {pool.length} bytes here is not {geometry.rows} rows of "
                    f"{geometry.page_bytes}-byte pages (the peer's pool shape {tuple(pools[key].shape)})"
                )
            link.remote_geometry[key] = geometry
            link.remote_addresses[key] = str(remote[key]["address"])
            if pool.geometry is None:
                assert pool.channel is not None
                pool.channel.register(KVMemory(local.schema(), local.entries, pool.buffer()))
                pool.geometry = local
            elif pool.geometry != local:
                raise ConfigError(
                    f"pool mr_key={key}: engine {remote_engine_id!r} implies pages {local}, another peer {pool.geometry}"
                )

    async def p2p_migrate(self, assignment: Any, async_op: bool = False) -> None:
        """Pull ``assignment.batch`` from ``assignment.remote_engine_id`` into our pools; returns once every byte
        arrived and was verified (the engine's loop keeps running meanwhile)."""
        link = self._link(assignment.remote_engine_id)
        runs = coalesce(assignment.batch)
        by_pool: dict[int, list[ByteRun]] = {}
        for run in runs:
            by_pool.setdefault(run.mr_key, []).append(run)
        plans: list[tuple[_Pool, tuple[BlockMapping, ...]]] = []
        for key, pool_runs in by_pool.items():
            pool = self._pools.get(key)
            if pool is None or pool.geometry is None or key not in link.remote_geometry:
                raise PlanError(f"assignment names pool mr_key={key}, not connected with engine {link.remote_engine_id!r}")
            plans.append((pool, runs_to_mappings(pool_runs, pool.geometry, link.remote_geometry[key])))
        if plans:
            await asyncio.wrap_future(self._loop.submit(self._pull(link, plans)))

    async def _pull(self, link: _Link, plans: list[tuple[_Pool, tuple[BlockMapping, ...]]]) -> None:
        tasks = [asyncio.ensure_future(self._pull_pool(link, pool, mappings)) for pool, mappings in plans]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one pool failed: the others stop too (their pulls abort at the peer)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pull_pool(self, link: _Link, pool: _Pool, mappings: tuple[BlockMapping, ...]) -> None:
        channel, geometry = pool.channel, pool.geometry
        assert channel is not None and geometry is not None
        peer = link.peers.get(pool.mr_key)
        if peer is None or peer not in channel.peers:
            peer = link.peers[pool.mr_key] = await channel.connect(link.remote_addresses[pool.mr_key])
        plan = TransferPlan(
            transfer_id=uuid.uuid4().hex, peer=peer, schema=geometry.schema(), mappings=mappings,
            priority=Priority.DECODE_CRITICAL,
        )  # fmt: skip
        await channel.pull(plan)

    def store(self, assignment: Any, async_op: bool = False) -> None:
        raise NotImplementedError("store: LMDeploy 0.18 defines it but never calls it (neither does DLSlime nor Mooncake)")

    def load(self, assignment: Any, async_op: bool = False) -> None:
        raise NotImplementedError("load: LMDeploy 0.18 defines it but never calls it (neither does DLSlime nor Mooncake)")

    def close(self) -> None:
        """Close every pool's channel (LMDeploy has no hook for it; the process exit does the same)."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            if pool.channel is not None:
                self._loop.call(pool.channel.aclose(), timeout=30)
                pool.channel = None

    def _link(self, remote_engine_id: Any) -> _Link:
        link = self.links.get(str(remote_engine_id))
        if link is None:
            known = ", ".join(sorted(self.links)) or "none"
            raise ConfigError(f"remote_engine_id={remote_engine_id!r} has no link: call p2p_initialize first (links: {known})")
        return link


OWN_NAME = "SageTransport"


def register(name: str | None = None, *, replace: bool | None = None) -> str:
    """Register :class:`SageMigrationBackend` in LMDeploy's ``MIGRATION_BACKENDS``; returns the name taken.

    By default the name is our own, ``SageTransport`` (added to LMDeploy's ``MigrationBackend`` and to its CLI's
    ``--migration-backend`` choices, :mod:`.lmdeploy_hooks`), so no other engine's name is taken.
    ``name`` (default ``SAGE_TRANSPORT_LMDEPLOY_AS``) may instead be one of LMDeploy's own members, for a launcher
    that cannot pass a new name; one whose engine is installed is refused unless ``replace`` (default
    ``SAGE_TRANSPORT_LMDEPLOY_REPLACE=1``). Either way a request whose migration fails fails alone
    (:func:`~.lmdeploy_hooks.fail_migrations_alone`)."""
    if not LMDEPLOY_AVAILABLE:
        raise ImportError("SageMigrationBackend needs LMDeploy (pip install lmdeploy)")
    import lmdeploy.pytorch.disagg.backend  # noqa: F401  (registers LMDeploy's own backends first)
    from lmdeploy.pytorch.disagg.backend.backend import MIGRATION_BACKENDS
    from lmdeploy.pytorch.disagg.config import MigrationBackend

    from .lmdeploy_hooks import add_backend_name, fail_migrations_alone

    name = name or os.environ.get("SAGE_TRANSPORT_LMDEPLOY_AS") or OWN_NAME
    if replace is None:
        replace = os.environ.get("SAGE_TRANSPORT_LMDEPLOY_REPLACE", "") in ("1", "true", "yes")
    if name == OWN_NAME:
        add_backend_name(name)
    else:
        members = [m.name for m in MigrationBackend if m.name != OWN_NAME]
        if name not in members:
            raise ConfigError(
                f"SAGE_TRANSPORT_LMDEPLOY_AS={name!r} is not a MigrationBackend name ({', '.join(members)}, or {OWN_NAME})"
            )
        if name in _ENGINE_MODULES and _installed(_ENGINE_MODULES[name]) and not replace:
            raise ConfigError(
                f"SAGE_TRANSPORT_LMDEPLOY_AS={name!r}: {_ENGINE_MODULES[name]} is installed and would be replaced; "
                "set SAGE_TRANSPORT_LMDEPLOY_REPLACE=1 to do so"
            )
    MIGRATION_BACKENDS.register_module(name, module=SageMigrationBackend, force=True)
    fail_migrations_alone()
    return name


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


REGISTERED_AS: str | None = None
if LMDEPLOY_AVAILABLE:
    try:
        REGISTERED_AS = register()
    except ConfigError as exc:  # importable anyway: register(...) explicitly
        warnings.warn(f"sage_transport: SageMigrationBackend not registered with LMDeploy: {exc}", stacklevel=2)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sage_transport.integrations.lmdeploy ARGS``: LMDeploy's CLI with the backend registered here
    and in every worker process LMDeploy spawns (they import this module as their main module)."""
    if REGISTERED_AS is None:
        raise SystemExit("sage_transport: SageMigrationBackend is not registered with LMDeploy (see the warning above)")
    print(f"sage_transport: SageMigrationBackend registered as --migration-backend {REGISTERED_AS}", file=sys.stderr)
    from lmdeploy.cli import run

    sys.argv = ["lmdeploy", *(sys.argv[1:] if argv is None else argv)]
    run()


if __name__ == "__main__":
    main()
