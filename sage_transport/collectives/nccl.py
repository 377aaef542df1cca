"""NCCL through torch.distributed, on dedicated CUDA streams, completion awaited by polling CUDA events.

Each traffic class has its own stream (``collective`` for tensor-parallel collectives, ``p2p`` for KV
send/recv). An op is issued under that stream after it waits, on the device, for the caller's current stream
(the producer of the tensor): the compute stream itself is never synchronised with the host. NCCL's work is made
to finish on the class stream (``work.wait()`` is a device-side wait for NCCL), an event is recorded there, and
the event loop polls it with an adaptive back-off: no thread blocks, the loop never parks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, ClassVar

from ..errors import UnsupportedError
from ..telemetry.core import Telemetry
from .base import ReduceOp
from .fusion import CommFusion
from .torch_backend import TorchProcessGroupBackend, poll_until

__all__ = ["NcclBackend", "TRAFFIC_CLASSES"]

TRAFFIC_CLASSES = ("collective", "p2p")


class NcclBackend(TorchProcessGroupBackend):
    """``ProcessGroupNCCL`` on CUDA tensors of ``device`` (default: ``LOCAL_RANK``, else rank modulo GPUs)."""

    name: ClassVar[str] = "nccl"
    devices: ClassVar[frozenset[str]] = frozenset({"cuda"})
    native_avg: ClassVar[bool] = True
    abort_in_place: ClassVar[bool] = True

    def __init__(self, rank: int, world_size: int, store: Any, *, timeout_s: float = 30.0, fusion: CommFusion | None = None,
                 overlap: int = 4, device: int | None = None, telemetry: Telemetry | None = None) -> None:  # fmt: skip
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedError("the nccl backend needs a CUDA device; none is visible")
        super().__init__(rank, world_size, store, timeout_s=timeout_s, fusion=fusion, overlap=overlap, telemetry=telemetry)
        if device is None:
            device = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        self.device = torch.device("cuda", device)
        self.streams = {name: torch.cuda.Stream(device=self.device) for name in TRAFFIC_CLASSES}  # type: ignore[no-untyped-call]

    def _make_group(self, store: Any, rank: int, world_size: int, timeout: datetime.timedelta) -> Any:
        import torch.distributed as dist

        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)

    async def _run(self, launch: Callable[[Any], Any], traffic: str = "collective") -> None:
        import torch

        stream = self.streams[traffic]
        stream.wait_stream(torch.cuda.current_stream(self.device))  # device-side: the producer finishes first
        with torch.cuda.stream(stream):
            work = launch(self._group())
            work.wait()  # device-side: the class stream waits for NCCL's stream
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        await poll_until(event.query)

    async def _do_barrier(self) -> None:
        import torch

        token = torch.zeros(1, device=self.device)
        await self._do_all_reduce(token, ReduceOp.SUM)
