"""A channel peer in a child process that dies (or stops) at a chosen phase of a transfer, for fault tests.

    python -m sage_transport.testing.peer --role receiver --transport ucx --die-at payload --how kill

Receiver role: listens, prints ``{"address": ...}``, and dies at ``announce`` (the announcement arrived, no chunk
yet), ``payload`` (a chunk's header arrived, its payload not yet) or ``ack`` (a chunk verified, its
acknowledgement not yet sent). Sender role (``--connect ADDR``): sends one transfer (``--transfer-id``, default
``t``) and dies at ``header`` (announced, no chunk frame sent yet), ``payload`` (after half the chunks)
or ``ack`` (the first acknowledgement arrived). Source role: listens like a receiver, its blocks hold 7s, and it
answers pulls (the parent fetches them with ``channel.pull``). Just before dying it prints ``{"dying": time.monotonic()}``
(CLOCK_MONOTONIC, comparable across the processes of one host), so the parent measures how long its side
took to notice.
``--how``: ``kill`` (SIGKILL), ``term`` (SIGTERM), ``exit`` (``os._exit``), ``stop`` (SIGSTOP; the parent sends
SIGCONT or SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..channel import KVTransferChannel
from ..config import KVTransportConfig
from ..memory import KVMemory
from ..plan import TransferPlan
from ..schema import KVCacheSchema
from ..session import PeerSession

__all__ = ["PEER_SCHEMA", "main"]

#: 4 layers × K/V × 4 KiB pages: 32 KiB per block.
PEER_SCHEMA = KVCacheSchema(num_layers=4, num_kv_heads=4, head_dim=256, block_size=2)


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _die(how: str) -> None:
    _say({"dying": time.monotonic()})
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        os._exit(3)


def _arm(phase: str, how: str, role: str, chunks: int) -> None:
    """Patch the phase's hook so that its first call (or the ``chunks``-th) kills this process."""
    fired = [False]

    def once() -> bool:
        if fired[0]:
            return False
        fired[0] = True
        return True

    if role == "receiver" and phase == "announce":
        original = KVTransferChannel._on_announce

        def on_announce(self: KVTransferChannel, *args: Any, **kwargs: Any) -> Any:
            if once():
                _die(how)
            return original(self, *args, **kwargs)

        KVTransferChannel._on_announce = on_announce  # type: ignore[method-assign,assignment]
    elif role == "receiver" and phase == "payload":
        sink = PeerSession._sink

        def on_sink(self: PeerSession, header: bytes, nbytes: int) -> Any:
            if once():
                _die(how)
            return sink(self, header, nbytes)

        PeerSession._sink = on_sink  # type: ignore[method-assign,assignment]
    elif role == "receiver" and phase == "ack":
        flush = PeerSession._flush_acks

        def on_flush(self: PeerSession, inc: Any) -> None:
            if inc.pending_acks and once():
                _die(how)
            flush(self, inc)

        PeerSession._flush_acks = on_flush  # type: ignore[method-assign,assignment]
    elif role == "sender" and phase in ("header", "payload"):
        send = PeerSession._send_chunk
        count = [0]

        async def on_send(self: PeerSession, out: Any, seq: int) -> None:
            count[0] += 1
            if (phase == "header" or count[0] > chunks // 2) and once():
                _die(how)
            await send(self, out, seq)

        PeerSession._send_chunk = on_send  # type: ignore[method-assign,assignment]
    elif role == "sender" and phase == "ack":
        on_ack = KVTransferChannel._on_ack

        def acked(self: KVTransferChannel, *args: Any) -> None:
            if once():
                _die(how)
            on_ack(self, *args)

        KVTransferChannel._on_ack = acked  # type: ignore[method-assign,assignment]
    elif phase != "never":
        raise SystemExit(f"unknown phase {phase!r} for role {role!r}")


async def _run(args: argparse.Namespace) -> None:
    config = KVTransportConfig.resolve(args.config, env={})
    memory = KVMemory.allocate(PEER_SCHEMA, args.blocks, fill=0 if args.role == "receiver" else 7)  # source: 7s
    _arm(args.die_at, args.how, args.role, args.blocks * 2)
    async with KVTransferChannel(args.transport, config, name=f"child-{args.role}-{os.getpid()}") as channel:
        channel.register(memory)
        if args.role in ("receiver", "source"):
            _say({"address": await channel.listen(), "name": channel.name})
            await asyncio.sleep(3600)
        else:
            peer = await channel.connect(args.connect)
            _say({"connected": peer, "name": channel.name})
            plan = TransferPlan.for_blocks(
                peer, PEER_SCHEMA, range(args.blocks), range(args.blocks), transfer_id=args.transfer_id
            )
            await channel.transfer(plan)
            _say({"done": True})
            await asyncio.sleep(3600)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a channel peer that dies at a chosen phase")
    parser.add_argument("--role", choices=("receiver", "sender", "source"), required=True)
    parser.add_argument("--transport", default="ucx")
    parser.add_argument("--config", default="", help="key=value,... for the channel")
    parser.add_argument("--die-at", default="never")
    parser.add_argument("--how", choices=("kill", "term", "exit", "stop"), default="kill")
    parser.add_argument("--connect", default=None, help="the parent's channel address (sender role)")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--transfer-id", default="t", help="the sender's transfer id")
    from ..cli import run_async

    run_async(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
