"""sageLLM adapters: ``sagellm_comm.CommBackend`` over our collectives, and the transfer backend
``sagellm_kv_cache.KVTransferEngine`` moves KV with.

Importing this module registers :class:`SageCommBackend` with sageLLM as ``"sage_transport"`` (where
``sagellm_comm`` is installed; importable without it)::

    import sage_transport.integrations.sagellm
    comm = sagellm_comm.get_comm_backend("sage_transport")
    comm.init(rank, world_size, master_addr, master_port)        # then sageLLM's 11 synchronous methods
    engine = KVTransferEngine(SageKVTransferBackend(comm))

sageLLM calls every method synchronously; each runs our async :class:`~sage_transport.collectives.CommBackend`
on the process's loop thread (:mod:`.loop_thread`) and waits for it. The collective backend is Gloo unless
``SAGE_TRANSPORT_COMM_BACKEND=nccl`` (or ``SageCommBackend("nccl")``). ``master_port=0`` takes the port from
``SAGE_TRANSPORT_COMM_PORT`` / ``MASTER_PORT`` (SagePorts' convention); none is hard-coded.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..collectives import CommBackend, ReduceOp, comm_port, create_comm_backend, open_comm_store
from ..errors import ConfigError, PlanError
from .loop_thread import LoopThread, shared_loop

try:
    import sagellm_comm
    from sagellm_comm import CommBackend as _SageLLMCommBackend
    from sagellm_comm import CommBackendType, CommGroup, CommOp

    SAGELLM_AVAILABLE = True
except ImportError:  # importable without sageLLM: the adapters themselves need it
    SAGELLM_AVAILABLE = False
    _SageLLMCommBackend = object  # type: ignore[assignment,misc]
    CommBackendType = CommGroup = CommOp = None  # type: ignore[assignment,misc]

__all__ = ["KV_TAG", "SAGELLM_AVAILABLE", "SageCommBackend", "SageKVTransferBackend", "register"]

_T = TypeVar("_T")
#: The point-to-point tag KV transfers use, apart from the engine's own ``send``/``recv``.
KV_TAG = 0x4B56


class SageCommBackend(_SageLLMCommBackend):  # type: ignore[misc]
    """sageLLM's ``CommBackend`` (init, get_rank, get_world_size, all_reduce, all_gather, broadcast, send, recv,
    barrier, create_group, destroy) over a sage_transport collective backend (``backend``: ``gloo`` or ``nccl``)."""

    def __init__(self, backend: str | None = None, *, timeout_s: float = 30.0, loop: LoopThread | None = None) -> None:
        if not SAGELLM_AVAILABLE:
            raise ImportError("SageCommBackend needs sageLLM's comm package (pip install isagellm-comm)")
        self.kind = backend or os.environ.get("SAGE_TRANSPORT_COMM_BACKEND", "gloo")
        if self.kind not in ("gloo", "nccl"):
            raise ConfigError(f"SAGE_TRANSPORT_COMM_BACKEND={self.kind!r}: sageLLM's backend runs over gloo or nccl")
        self.timeout_s = timeout_s
        self._loop = loop or shared_loop()
        self._world: CommBackend | None = None
        self._store: Any = None
        self._groups: dict[str, tuple[Any, CommBackend | None]] = {}  # group id → (CommGroup, our backend if a member)

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._loop.call(coro, timeout=self.timeout_s + 30)

    @property
    def world(self) -> CommBackend:
        """The sage_transport backend of every rank (``init`` first)."""
        if self._world is None:
            raise ConfigError("SageCommBackend: call init(rank, world_size, master_addr, master_port) first")
        return self._world

    def init(self, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        """Join ``world_size`` ranks through the rendezvous store at ``master_addr:master_port`` (rank 0 hosts it)."""
        if self._world is not None:
            raise ConfigError(f"SageCommBackend already initialised as rank {self._world.rank} of {self._world.world_size}")
        port = int(master_port) if master_port else comm_port(find_free=False)

        async def start() -> tuple[Any, CommBackend]:
            store = await open_comm_store(master_addr, port, rank, world_size, self.timeout_s)
            backend = await create_comm_backend(
                self.kind, rank=rank, world_size=world_size, store=store, timeout_s=self.timeout_s
            )
            return store, backend

        self._store, self._world = self._call(start())

    def get_rank(self) -> int:
        return self.world.rank

    def get_world_size(self) -> int:
        return self.world.world_size

    def _member(self, group: Any) -> CommBackend:
        if group is None:
            return self.world
        entry = self._groups.get(group.group_id)
        if entry is None:
            raise ConfigError(f"group {group.group_id!r} was not created by this backend (create_group)")
        if entry[1] is None:
            raise ConfigError(f"rank {self.world.rank} is not in group {group.group_id!r} (ranks {list(group.ranks)})")
        return entry[1]

    def _group_rank(self, group: Any, rank: int, name: str) -> int:
        if group is None:
            return rank
        if rank not in group.ranks:
            raise ConfigError(f"{name}={rank} is not in group {group.group_id!r} (ranks {list(group.ranks)})")
        return list(group.ranks).index(rank)

    def all_reduce(self, tensor: Any, op: Any = None, group: Any = None) -> Any:
        reduce = ReduceOp.SUM if op is None else _REDUCE_OPS.get(getattr(op, "value", op)) or ReduceOp.parse(op)
        return self._call(self._member(group).all_reduce(tensor, reduce))

    def all_gather(self, tensor: Any, group: Any = None) -> list[Any]:
        """Every member's ``tensor``, as a list in rank order."""
        return list(self._call(self._member(group).all_gather(tensor)).unbind(0))

    def broadcast(self, tensor: Any, src_rank: int, group: Any = None) -> Any:
        return self._call(self._member(group).broadcast(tensor, self._group_rank(group, src_rank, "src_rank")))

    def send(self, tensor: Any, dst_rank: int) -> None:
        self._call(self.world.send(tensor, dst_rank))

    def recv(self, tensor: Any, src_rank: int) -> None:
        self._call(self.world.recv(tensor, src_rank))

    def barrier(self, group: Any = None) -> None:
        self._call(self._member(group).barrier())

    def create_group(self, ranks: list[int], group_id: str | None = None) -> Any:
        """A sub-group of ``ranks``; its members must all call this (as with ``torch.distributed.new_group``)."""
        members = sorted(dict.fromkeys(int(r) for r in ranks))
        if not members or members[0] < 0 or members[-1] >= self.world.world_size:
            raise ConfigError(f"ranks={list(ranks)} must be a non-empty set of ranks in 0..{self.world.world_size - 1}")
        group_id = group_id or f"group-{'-'.join(map(str, members))}"
        if group_id in self._groups:
            raise ConfigError(f"group_id={group_id!r} already exists")
        backend_type = CommBackendType.NCCL if self.kind == "nccl" else CommBackendType.GLOO
        group = CommGroup(group_id=group_id, ranks=members, world_size=len(members), backend_type=backend_type)
        sub: CommBackend | None = None
        if self.world.rank in members:
            import torch.distributed as dist

            store = dist.PrefixStore(f"sage_transport/{group_id}/", self._store)  # type: ignore[attr-defined]
            sub = self._call(
                create_comm_backend(
                    self.kind, rank=members.index(self.world.rank), world_size=len(members), store=store, timeout_s=self.timeout_s
                )
            )
        self._groups[group_id] = (group, sub)
        return group

    def destroy(self) -> None:
        """Close every group's backend and the world's."""
        backends = [sub for _, sub in self._groups.values() if sub is not None]
        if self._world is not None:
            backends.append(self._world)
        self._groups.clear()
        self._world = None
        for backend in backends:
            self._call(backend.aclose())


_REDUCE_OPS = {"sum": ReduceOp.SUM, "max": ReduceOp.MAX, "min": ReduceOp.MIN, "prod": ReduceOp.PRODUCT, "avg": ReduceOp.AVG}


class SageKVTransferBackend:
    """The transfer backend ``sagellm_kv_cache.KVTransferEngine`` takes (``get_rank``, ``get_world_size``,
    ``send``, ``recv``), over a :class:`SageCommBackend`. KV goes on a tag of its own (:data:`KV_TAG`), so it never
    matches the engine's other point-to-point messages, and each payload is preceded by its length: a receive
    buffer of another size is an error naming both sizes, not a hang. Payloads are torch tensors (contiguous),
    or bytes-like objects (the engine's compression and checksum path sends bytes; a ``bytearray`` receive
    buffer takes whatever length arrives)."""

    def __init__(self, comm: SageCommBackend, *, tag: int = KV_TAG) -> None:
        self.comm, self.tag = comm, tag
        self.bytes_sent = self.bytes_received = 0

    def get_rank(self) -> int:
        return self.comm.get_rank()

    def get_world_size(self) -> int:
        return self.comm.get_world_size()

    def _device(self) -> str:
        return "cuda" if self.comm.kind == "nccl" else "cpu"

    def send(self, tensor: Any, dst_rank: int) -> None:
        import torch

        payload = _byte_tensor(tensor)
        header = torch.tensor([payload.numel()], dtype=torch.int64, device=payload.device)
        world = self.comm.world

        async def go() -> None:
            await world.send(header, dst_rank, tag=self.tag)
            if payload.numel():
                await world.send(payload, dst_rank, tag=self.tag)

        self.comm._call(go())
        self.bytes_sent += payload.numel()

    def recv(self, tensor: Any, src_rank: int) -> None:
        import torch

        world = self.comm.world
        header = torch.zeros(1, dtype=torch.int64, device=self._device())
        resizable = isinstance(tensor, bytearray)

        async def go() -> Any:
            await world.recv(header, src_rank, tag=self.tag)
            size = int(header.item())
            if resizable:
                sink = torch.empty(size, dtype=torch.uint8)
            else:
                sink = _byte_tensor(tensor, writable=True)
                if sink.numel() != size:
                    drain = torch.empty(size, dtype=torch.uint8, device=sink.device)
                    if size:
                        await world.recv(drain, src_rank, tag=self.tag)  # keep the stream in step for the next one
                    raise PlanError(f"recv from rank {src_rank}: {size} bytes arrived for a buffer of {sink.numel()} bytes")
            if size:
                await world.recv(sink, src_rank, tag=self.tag)
            return sink

        sink = self.comm._call(go())
        if resizable:
            tensor[:] = sink.numpy().tobytes()
        self.bytes_received += sink.numel()


def _byte_tensor(obj: Any, *, writable: bool = False) -> Any:
    """``obj`` as a flat uint8 torch tensor sharing its memory (bytes are copied: they are immutable)."""
    import torch

    if isinstance(obj, torch.Tensor):
        if not obj.is_contiguous():
            raise PlanError(f"tensor of shape {tuple(obj.shape)} is not contiguous")
        return obj.detach().reshape(-1).view(torch.uint8)
    if isinstance(obj, bytes) and not writable:
        return torch.frombuffer(bytearray(obj), dtype=torch.uint8) if obj else torch.empty(0, dtype=torch.uint8)
    try:
        view = memoryview(obj).cast("B")
    except TypeError as exc:
        raise PlanError(f"{type(obj).__name__} is neither a tensor nor a bytes-like buffer") from exc
    if writable and view.readonly:
        raise PlanError(f"{type(obj).__name__} buffer is read-only")
    return torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)


def register(name: str = "sage_transport") -> str:
    """Register :class:`SageCommBackend` with ``sagellm_comm.register_comm_backend`` (once; again is a no-op)."""
    if not SAGELLM_AVAILABLE:
        raise ImportError("registering with sageLLM needs isagellm-comm")
    if sagellm_comm.is_comm_backend_available(name):
        from sagellm_comm.registry import _COMM_REGISTRY

        if _COMM_REGISTRY.get(name) is not SageCommBackend:
            raise ConfigError(f"sageLLM already has a comm backend named {name!r} that is not sage_transport's")
        return name
    sagellm_comm.register_comm_backend(name, SageCommBackend)
    return name


if SAGELLM_AVAILABLE:
    register()
