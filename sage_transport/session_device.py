"""A session's device path: chunks of device KV (GPU memory) gathered, checksummed, encoded and landed on the
device (:mod:`.device.kv`); placing them straight into a same-host peer's device KV is the send path's placement
job, run by :class:`~sage_transport.device.ipc.DeviceWriter` on the device.

Each step is queued on the channel's stream and awaited through an event, so the loop keeps moving other chunks
while the device works. Frames, headers, windows, acknowledgements and resends are the host path's: only where
the bytes are read and written differs. With a transport that moves device memory (UCX with ``cuda_copy``) the
payload goes from and lands in device staging; with any other it is staged through pinned host memory.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from .errors import ProtocolError
from .session_state import SessionState
from .transfers import Incoming, Outgoing, TransferStatus
from .wire import Chunk, Nack, Placed, encode_message


def _transport_form(payload: Any) -> Any:
    """A host tensor as a memoryview (any transport takes it); a device tensor as it is (UCX takes it)."""
    return memoryview(payload.numpy()) if payload.device.type == "cpu" else payload


class DevicePath(SessionState):
    """Sending, landing and placing chunks of device KV."""

    async def _send_device_chunk(self, out: Outgoing, seq: int) -> None:
        device = self.host.device
        codec = out.codec
        checksum = out.checksum is not None
        if codec is not None:
            self._encoding += 1
        try:
            payload, value, held = await device.outgoing(out.table, seq, codec, checksum, not self.host.device_wire)
        except ProtocolError as exc:  # this transfer's data cannot take the codec (inf, NaN): fail it, not the peer
            self.host.fail_outgoing(out, ProtocolError(f"transfer {out.plan.transfer_id}, chunk {seq}: {exc}"), notify=True)
            return
        finally:
            if codec is not None:
                self._encoding -= 1
        try:
            if out.future.done():  # failed or cancelled meanwhile: nothing to send
                return
            nbytes = int(payload.numel())
            if codec is not None:
                out.wire_bytes[seq] = nbytes  # type: ignore[index]
            attempt = out.attempts[seq]
            if attempt < 255:
                out.attempts[seq] = attempt + 1
            if out.announce is not None:  # the transfer's only chunk, first copy: its announcement is the header
                header = encode_message(msgspec.structs.replace(out.announce, inline_checksum=value))
                out.announce = None
            else:
                header = encode_message(Chunk(out.wire_id, seq, attempt, value))
            if not out.first_send_at:
                out.first_send_at = asyncio.get_running_loop().time()
                out.status = TransferStatus.RUNNING
            tracer = self.host.tracer
            started = time.perf_counter()
            if out.sent_at is not None:
                out.sent_at[seq] = started
            await self.conn.send(header, _transport_form(payload))
            if tracer is not None:
                tracer.sent(self.peer, out.plan.transfer_id, seq, started, time.perf_counter())
            out.bytes_sent += nbytes
            self.count_sent(1, nbytes)
        finally:
            device.release(*held)

    # ---- receiving ----------------------------------------------------------------------------------

    def _device_target(self, nbytes: int) -> Any:
        """The sink's buffer for a chunk of device KV: device staging (a transport that moves it) or pinned."""
        buffer = self.host.device.incoming_buffer(nbytes, self.host.device_wire)
        self._device_in = buffer
        return _transport_form(buffer[:nbytes])

    def _start_device_land(self, inc: Incoming, seq: int, nbytes: int, msg: Chunk) -> None:
        """Land a received chunk on the device; acknowledged (or refused) once its event fired."""
        buffer, self._device_in = self._device_in, None
        inc.decoding.add(seq)
        self._decoding += 1
        expected = msg.checksum if inc.checksum is not None else None
        land = self.host.device.land(inc.table, seq, buffer, nbytes, inc.codec, expected, not self._zero_copy)
        task = asyncio.ensure_future(land)
        arrived = time.perf_counter() if self.host.tracer is not None else 0.0
        task.add_done_callback(lambda t: self._device_landed(inc, seq, nbytes, msg.attempt, arrived, t))

    def _device_landed(
        self, inc: Incoming, seq: int, nbytes: int, attempt: int, arrived: float, task: asyncio.Task[bool]
    ) -> None:
        self._decoding -= 1
        inc.decoding.discard(seq)
        self._decode_done.set()
        if self.closed or task.cancelled() or self.incoming.get(inc.wire_id) is not inc:
            return
        exc = task.exception()
        if exc is not None:
            err = ProtocolError(f"chunk {seq} of transfer {inc.transfer_id} from {self.peer} did not land on the device: {exc}")
            self.host.fail_incoming(self, inc, err, notify=True)
            return
        if not task.result():
            self.host.counters["checksum_failures"] += 1
            inc.bad_chunks += 1
            self.post(Nack(inc.wire_id, seq, attempt, "checksum mismatch"))
            return
        if inc.codec is not None:
            inc.wire_bytes += nbytes
        tracer = self.host.tracer
        if tracer is not None:
            tracer.received(self.peer, inc.transfer_id, seq, arrived, time.perf_counter())
        self._accept(inc, seq)

    def _verify_placed_on_device(self, inc: Incoming, msg: Placed) -> None:
        """A placed chunk of our device KV checked where it landed, on the device; then accepted or refused."""
        inc.decoding.add(msg.seq)
        task = asyncio.ensure_future(self.host.device.checksum_pages(inc.table, msg.seq))

        def checked(t: asyncio.Task[int]) -> None:
            inc.decoding.discard(msg.seq)
            if self.closed or t.cancelled() or self.incoming.get(inc.wire_id) is not inc:
                return
            if t.exception() is not None or t.result() != msg.checksum:
                self.host.counters["checksum_failures"] += 1
                inc.bad_chunks += 1
                self.post(Nack(inc.wire_id, msg.seq, msg.attempt, "checksum mismatch (placed)"))
                return
            self._accept(inc, msg.seq)

        task.add_done_callback(checked)
