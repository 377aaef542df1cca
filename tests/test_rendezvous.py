"""Addresses by name through a store: torch's TCPStore (real) and etcd's v3 JSON gateway (a stand-in server
speaking the same requests), one sender finding two receivers."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sage_transport import KVCacheSchema, KVMemory, KVTransferChannel, TransferPlan
from sage_transport.errors import ConfigError, TransferTimeoutError
from sage_transport.rendezvous import EtcdStore, connect_by_name, lookup, open_store, publish

from .conftest import filled

SCHEMA = KVCacheSchema(num_layers=2, num_kv_heads=2, head_dim=32, block_size=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def etcd() -> Iterator[tuple[str, dict[str, str]]]:
    data: dict[str, str] = {}

    class Gateway(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            key = base64.b64decode(body["key"]).decode()
            if self.path == "/v3/kv/put":
                data[key] = base64.b64decode(body["value"]).decode()
                reply: dict[str, object] = {"header": {}}
            elif self.path == "/v3/kv/range":
                reply = {"header": {}}
                if key in data:
                    reply["kvs"] = [{"key": body["key"], "value": base64.b64encode(data[key].encode()).decode()}]
            else:
                self.send_error(404)
                return
            out = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"etcd://127.0.0.1:{server.server_address[1]}", data
    finally:
        server.shutdown()
        server.server_close()


async def _one_sender_two_receivers(sender_store, receiver_stores) -> None:  # type: ignore[no-untyped-def]
    blocks = 32
    src = filled(SCHEMA, blocks)
    dsts = [KVMemory.allocate(SCHEMA, blocks, fill=0) for _ in receiver_stores]
    async with (
        KVTransferChannel("ucx", name="decode-0") as r0,
        KVTransferChannel("ucx", name="decode-1") as r1,
        KVTransferChannel("ucx", name="prefill-0") as tx,
    ):
        tx.register(src)
        for channel, dst, store in zip((r0, r1), dsts, receiver_stores):
            channel.register(dst)
            await publish(channel, store)
        for name, dst in (("decode-0", dsts[0]), ("decode-1", dsts[1])):
            peer = await connect_by_name(tx, sender_store, name, timeout_s=10)
            result = await tx.transfer(TransferPlan.for_blocks(peer, SCHEMA, range(blocks), range(blocks)))
            assert result.integrity.value == "verified"
            assert np.array_equal(np.frombuffer(dst.buffers[0], np.uint8), np.frombuffer(src.buffers[0], np.uint8))


async def test_tcpstore_publishes_addresses_for_many_peers() -> None:
    pytest.importorskip("torch")
    port = _free_port()
    server = open_store(f"tcpstore://127.0.0.1:{port}", is_server=True)
    clients = [open_store(f"tcpstore://127.0.0.1:{port}") for _ in range(2)]
    await _one_sender_two_receivers(server, clients)
    with pytest.raises(TransferTimeoutError, match="nobody"):
        await lookup(server, "nobody", timeout_s=0.2)


async def test_etcd_gateway_publishes_addresses(etcd) -> None:  # type: ignore[no-untyped-def]
    url, data = etcd
    store = open_store(url)
    assert isinstance(store, EtcdStore)
    await _one_sender_two_receivers(store, [open_store(url), open_store(url)])
    assert set(data) == {"sage_transport/addr/decode-0", "sage_transport/addr/decode-1"}
    assert all(":" in address for address in data.values())
    with pytest.raises(TransferTimeoutError):
        await lookup(store, "nobody", timeout_s=0.1)


def test_bad_store_urls_name_the_value() -> None:
    with pytest.raises(ConfigError, match="redis://x:1"):
        open_store("redis://x:1")
    with pytest.raises(ConfigError, match="'tcpstore'"):
        open_store("tcpstore")
