"""The seam between interface R's message flow and the bytes on the wire.

The R protocol (sessmob.rm.peer) only sends and receives message maps over a Channel; how they
travel is a Transport's business. PlainTransport is TCP with the frames of sessmob.rm.wire; the
encrypted, mutually authenticated transport (Noise KK) slots in by implementing the same two
protocols: it runs its handshake inside `connect` and before calling `on_channel`, and reports
the authenticated device in `Channel.peer_name`, so the flow code never changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from sessmob.rm.wire import MAX_FRAME, encode_frame, read_frame

log = logging.getLogger(__name__)


class Channel(Protocol):
    """One connection to another RM, carrying whole messages in order."""

    peer_name: str | None  # the authenticated peer device; None when the transport has no auth

    async def send(self, msg: dict[str, Any]) -> None:
        """Send one message (a map with "t" and "id"); ConnectionError if the channel is gone."""
        ...

    async def recv(self) -> dict[str, Any]:
        """The next message; ConnectionError on EOF, WireError on a malformed frame."""
        ...

    async def close(self) -> None:
        """Close the channel; idempotent."""
        ...


class Transport(Protocol):
    """How RMs reach each other: dial one, or accept many."""

    async def connect(self, host: str, port: int, *, timeout: float) -> Channel:
        """A channel to the RM at host:port; OSError / TimeoutError if it cannot be made."""
        ...

    async def serve(
        self, host: str, port: int, on_channel: Callable[[Channel], Awaitable[None]]
    ) -> asyncio.AbstractServer:
        """Listen; run `on_channel` for each accepted channel and close it when that returns."""
        ...


class PlainChannel:
    """A Channel over one TCP stream, without encryption or authentication."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.peer_name: str | None = None
        self._reader = reader
        self._writer = writer
        self._max_frame = max_frame
        self._closed = False
        peer = writer.get_extra_info("peername")
        self.peer_address: str = _fmt_addr(peer)

    async def send(self, msg: dict[str, Any]) -> None:
        if self._closed or self._writer.is_closing():
            raise ConnectionError(f"channel to {self.peer_address} is closed")
        self._writer.write(encode_frame(msg))
        await self._writer.drain()

    async def recv(self) -> dict[str, Any]:
        if self._closed:
            raise ConnectionError(f"channel to {self.peer_address} is closed")
        return await read_frame(self._reader, self._max_frame)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()

    def __repr__(self) -> str:
        return f"<PlainChannel {self.peer_address}{' closed' if self._closed else ''}>"


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # Requests inside the freeze window are tiny and latency-bound: never let Nagle hold them.
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PlainTransport:
    """TCP with length-prefixed msgpack frames: for tests and until the secure channel lands."""

    def __init__(self, *, max_frame: int = MAX_FRAME, source: str | None = None) -> None:
        """`source`: the device's own address to connect from. Without it the kernel may
        pick a session address as source, and the channel dies when that address moves
        away in the middle of a migration."""
        self.max_frame = max_frame
        self.source = source

    async def connect(self, host: str, port: int, *, timeout: float) -> PlainChannel:
        local = (self.source, 0) if self.source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local), timeout
        )
        _nodelay(writer)
        return PlainChannel(reader, writer, max_frame=self.max_frame)

    async def serve(
        self, host: str, port: int, on_channel: Callable[[Channel], Awaitable[None]]
    ) -> asyncio.AbstractServer:
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ch = PlainChannel(reader, writer, max_frame=self.max_frame)
            try:
                _nodelay(writer)
                await on_channel(ch)
            except Exception:
                log.exception("R channel from %s failed", ch.peer_address)
            finally:
                await ch.close()

        return await asyncio.start_server(accepted, host, port)
