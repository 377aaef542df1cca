"""Where device KV's work runs: a dedicated stream, events polled from the event loop, pinned host staging.

:class:`CudaRuntime` is one CUDA device: every copy, checksum and codec kernel of the channel runs on its own
stream (never the engine's compute stream), each step ends with an event, and the event loop polls that event
(:func:`wait`) with the NCCL backend's back-off, so no thread blocks and nothing synchronises the device.
:class:`EmulatedRuntime` runs the very same torch operations on host tensors where no GPU exists: the device
path's logic (tables, staging, checksums, codecs, placement through handles) is tested on every CPU machine,
and only the stream, the events and the CUDA IPC calls are left to the GPU tests.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import UnsupportedError
from ..polling import poll_until

__all__ = ["CudaRuntime", "DeviceRuntime", "EmulatedRuntime", "wait"]


async def wait(done: Callable[[], bool]) -> None:
    """Until ``done()`` (an event's ``query``), polled from the loop with the NCCL backend's back-off."""
    await poll_until(done)


class DeviceRuntime(abc.ABC):
    """One device's stream, events and staging (see the module docstring)."""

    kind = "cuda"  # the memory kind it serves, as the channel and its peers name it
    name = "?"
    device: Any

    @abc.abstractmethod
    def stream(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which torch operations run on this runtime's stream."""

    @abc.abstractmethod
    def record(self) -> Any:
        """An event recorded on the stream now: ``query()`` is true once all work queued before it is done."""

    @abc.abstractmethod
    def after(self, event: Any) -> None:
        """The stream waits for ``event`` (recorded on another stream, the engine's) on the device: no host wait."""

    @abc.abstractmethod
    def host_buffer(self, nbytes: int) -> Any:
        """A uint8 host tensor the device copies to and from asynchronously (pinned for CUDA)."""

    @abc.abstractmethod
    def device_uuid(self) -> str:
        """The device's UUID: two processes on one host use the same GPU when these match."""

    def device_buffer(self, nbytes: int) -> Any:
        import torch

        with self.stream():
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def upload(self, array: np.ndarray) -> Any:
        """An int64 device tensor holding ``array`` (copied once, through pinned memory)."""
        import torch

        host = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if self.device.type == "cpu":
            return host
        pinned = host.pin_memory()
        with self.stream():
            out = torch.empty(host.shape, dtype=torch.int64, device=self.device)
            out.copy_(pinned, non_blocking=True)
        self.keep_until_done(pinned)
        return out

    def keep_until_done(self, *objects: Any) -> None:
        """Hold host buffers a queued copy still reads until the stream has passed this point."""
        event = self.record()
        self._held.append((event, objects))
        while self._held and self._held[0][0].query():
            self._held.pop(0)

    _held: list[tuple[Any, tuple[Any, ...]]]


class CudaRuntime(DeviceRuntime):
    """A CUDA device with a stream of the channel's own."""

    name = "cuda"

    def __init__(self, device: Any) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedError("CUDA memory was registered but torch sees no CUDA device")
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self._torch = torch
        self._held = []

    def stream(self) -> contextlib.AbstractContextManager[Any]:
        return self._torch.cuda.stream(self._stream)

    def record(self) -> Any:
        event = self._torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._stream)
        return event

    def after(self, event: Any) -> None:
        self._stream.wait_event(event)

    def host_buffer(self, nbytes: int) -> Any:
        return self._torch.empty(nbytes, dtype=self._torch.uint8, pin_memory=True)

    def device_uuid(self) -> str:
        props = self._torch.cuda.get_device_properties(self.device)
        uuid = getattr(props, "uuid", None)  # torch >= 2.2; before it, the name and index (one process's view)
        return str(uuid) if uuid is not None else f"{props.name}#{self.device.index}"


class _Done:
    """An emulated event: its work ran when it was queued; it reports pending once, so callers really poll."""

    __slots__ = ("_asked",)

    def __init__(self) -> None:
        self._asked = False

    def query(self) -> bool:
        asked, self._asked = self._asked, True
        return asked


class EmulatedRuntime(DeviceRuntime):
    """Host torch tensors standing in for a device: the same operations, run at once; events poll once."""

    name = "emulated"

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self._torch = torch
        self._held = []
        self.waited_on: list[Any] = []  # engine events the stream was told to wait for (tests read it)

    def stream(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def record(self) -> Any:
        return _Done()

    def after(self, event: Any) -> None:
        self.waited_on.append(event)

    def host_buffer(self, nbytes: int) -> Any:
        return self._torch.empty(nbytes, dtype=self._torch.uint8)

    def device_uuid(self) -> str:
        return "emulated"
