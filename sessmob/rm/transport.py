"""The seam between interface R's message flow and the bytes on the wire.

The R protocol (sessmob.rm.peer) only sends and receives message maps over a Channel; how they
travel is a Transport's business. PlainTransport is TCP with the frames of sessmob.rm.wire; the
encrypted, mutually authenticated transport (Noise KK) slots in by implementing the same two
protocols: it runs its handshake inside `connect` and before calling `on_channel`, and reports
the authenticated device in `Channel.peer_name`, so the flow code never changes.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from sessmob.listening import accept_failed
from sessmob.rm.wire import HEADER_LEN, MAX_FRAME, WireError, decode_frame, encode_frame

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

    def recv_now(self, timeout: float) -> dict[str, Any] | None:
        """The next message if it comes within `timeout` seconds, read synchronously with the
        event loop held (inside the freeze window), else None; errors as recv(). It shares
        recv()'s buffer: the two may be mixed."""
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
    ) -> Listener:
        """Listen; run `on_channel` for each accepted channel and close it when that returns."""
        ...


class Listener(Protocol):
    """What `Transport.serve` returns (the part of asyncio.Server that RMs use)."""

    @property
    def sockets(self) -> tuple[socket.socket, ...]: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class SocketChannel:
    """A Channel over a connected non-blocking TCP socket, without asyncio streams.

    Besides `recv`, it offers `recv_now(timeout)`: read the next frame synchronously, holding
    the event loop. The exporting RM uses it to wait for the importing RM's answer inside the
    freeze window, the importing RM to wait for the transfer that follows a reservation: there
    a trip through the loop (reader callback, future, task step) costs more than the wait
    itself. Both read the same buffer, so they can be mixed freely. Used on both ends.
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME) -> None:
        self.peer_name: str | None = None
        self._sock = sock
        self._max_frame = max_frame
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._eof = False
        self._closed = False
        # One waiter per direction: the client's reader task waits to read while a call may
        # wait to write (a frame larger than the socket's buffer).
        self._waiters: dict[bool, asyncio.Future[None]] = {}  # writable? -> waiter
        self._send_lock = asyncio.Lock()  # one frame at a time: frames never interleave
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.peer_address: str = _fmt_addr(sock.getpeername())

    async def send(self, msg: dict[str, Any]) -> None:
        """Send one frame. A send cut short (cancelled, timed out, failed) after part of the
        frame went out closes the channel: the peer would read what follows as the rest of
        that frame."""
        frame = memoryview(encode_frame(msg))
        async with self._send_lock:
            if self._closed:
                raise ConnectionError(f"channel to {self.peer_address} is closed")
            view = frame
            try:
                while view:
                    try:
                        n = self._sock.send(view)
                    except (BlockingIOError, InterruptedError):
                        await self._ready(writable=True)
                        continue
                    except OSError as e:
                        raise ConnectionError(f"channel to {self.peer_address}: {e}") from e
                    view = view[n:]
            except BaseException:
                if len(view) < len(frame):
                    await self.close()
                raise

    async def recv(self) -> dict[str, Any]:
        while True:
            msg = self._frame()
            if msg is not None:
                return msg
            await self._ready(writable=False)
            self._fill()

    def recv_now(self, timeout: float) -> dict[str, Any] | None:
        """The next frame if one arrives within `timeout` seconds, else None (loop held)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._frame()
            if msg is not None:
                if self._buf:  # more came with it: a recv() waiting for the socket takes it
                    self._wake(False)
                return msg
            left = deadline - time.monotonic()
            if left <= 0 or not self._poll.poll(left * 1e3):
                return None
            self._fill()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        self._wake(False)
        self._wake(True)
        self._sock.close()

    def _frame(self) -> dict[str, Any] | None:
        """A whole frame from the buffer; None if more bytes are needed."""
        if self._closed:
            raise ConnectionError(f"channel to {self.peer_address} is closed")
        buf = self._buf
        if len(buf) >= HEADER_LEN:
            size = int.from_bytes(buf[:HEADER_LEN], "big")
            if size > self._max_frame:
                raise WireError(
                    f"frame of {size} bytes announced, over the {self._max_frame}-byte limit"
                )
            if size == 0:
                raise WireError("empty frame")
            end = HEADER_LEN + size
            if len(buf) >= end:
                msg = decode_frame(bytes(buf[HEADER_LEN:end]))
                del buf[:end]  # only now: a bad frame stays, every later read meets it too
                return msg
        if self._eof:
            if not buf:
                raise ConnectionError("connection closed by peer")
            if len(buf) < HEADER_LEN:
                raise WireError(f"truncated frame header ({len(buf)} of {HEADER_LEN} bytes)")
            raise WireError(f"truncated frame ({len(buf) - HEADER_LEN} bytes of it received)")
        return None

    def _fill(self) -> None:
        """One non-blocking read into the buffer (nothing there yet is not an error)."""
        if self._closed:
            raise ConnectionError(f"channel to {self.peer_address} is closed")
        try:
            data = self._sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise ConnectionError(f"channel to {self.peer_address}: {e}") from e
        if data:
            self._buf += data
        else:
            self._eof = True

    async def _ready(self, *, writable: bool) -> None:
        fd = self._sock.fileno()
        fut = self._loop.create_future()
        self._waiters[writable] = fut
        add, remove = (
            (self._loop.add_writer, self._loop.remove_writer)
            if writable
            else (self._loop.add_reader, self._loop.remove_reader)
        )
        add(fd, self._wake, writable)
        try:
            await fut
        finally:
            self._waiters.pop(writable, None)
            if not self._closed:
                remove(fd)

    def _wake(self, writable: bool) -> None:
        fut = self._waiters.get(writable)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def __repr__(self) -> str:
        return f"<SocketChannel {self.peer_address}{' closed' if self._closed else ''}>"


_RECV_SIZE = 256 * 1024


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class PlainTransport:
    """TCP with length-prefixed msgpack frames: for tests and until the secure channel lands."""

    def __init__(self, *, max_frame: int = MAX_FRAME, source: str | None = None) -> None:
        """`source`: the device's own address to connect from. Without it the kernel may
        pick a session address as source, and the channel dies when that address moves
        away in the middle of a migration."""
        self.max_frame = max_frame
        self.source = source

    async def connect(self, host: str, port: int, *, timeout: float) -> SocketChannel:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            # Requests inside the freeze window are tiny and latency-bound: no Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.source:
                sock.bind((self.source, 0))
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            return SocketChannel(sock, max_frame=self.max_frame)
        except BaseException:
            sock.close()
            raise

    async def serve(
        self, host: str, port: int, on_channel: Callable[[Channel], Awaitable[None]]
    ) -> SocketListener:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return SocketListener(sock, on_channel, self.max_frame)


class SocketListener:
    """A listening socket whose accepted connections become SocketChannels, each handed to
    `on_channel` in its own task and closed when that returns."""

    def __init__(
        self,
        sock: socket.socket,
        on_channel: Callable[[Channel], Awaitable[None]],
        max_frame: int,
    ) -> None:
        self._sock = sock
        self._on_channel = on_channel
        self._max_frame = max_frame
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def close(self) -> None:
        """Stop accepting (channels already accepted run on, as with asyncio.Server)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        return None

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                accept_failed(self._loop, self._sock, self._accept, e, log, "R listener")
                return
            try:
                conn.setblocking(False)
                # Requests inside the freeze window are tiny and latency-bound: no Nagle.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ch = SocketChannel(conn, max_frame=self._max_frame)
            except OSError as e:  # the peer went already
                log.warning("R listener: accepted connection unusable: %s", e)
                conn.close()
                continue
            task = self._loop.create_task(self._run(ch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, ch: SocketChannel) -> None:
        try:
            await self._on_channel(ch)
        except Exception:
            log.exception("R channel from %s failed", ch.peer_address)
        finally:
            await ch.close()
