"""SocketChannel, the R client's channel: frames read through the loop (recv) or straight off
the socket inside the freeze window (recv_now), from one buffer, with hostile bytes refused the
same way whichever path meets them, and again on every later read (nothing is skipped)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest

from sessmob.rm.transport import SocketChannel
from sessmob.rm.wire import WireError, encode_frame

Scenario = Callable[[SocketChannel, socket.socket], Awaitable[None]]


def run(scenario: Scenario, *, max_frame: int = 1 << 20) -> None:
    """The channel on one end of a socket pair, the test's raw socket on the other."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        ch = SocketChannel(ours, max_frame=max_frame)
        try:
            await asyncio.wait_for(scenario(ch, theirs), 5)
        finally:
            await ch.close()
            theirs.close()

    asyncio.run(main())


def msg(i: int, **extra: Any) -> dict[str, Any]:
    return {"t": "done", "id": i, **extra}


def test_recv_now_reads_frames_in_order_and_gives_none_when_nothing_comes() -> None:
    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        assert ch.recv_now(0.01) is None
        peer.sendall(encode_frame(msg(1)) + encode_frame(msg(2, p=b"x" * 100_000)))
        assert ch.recv_now(1.0) == msg(1)
        assert ch.recv_now(1.0) == msg(2, p=b"x" * 100_000)
        t0 = time.monotonic()
        assert ch.recv_now(0.05) is None
        assert time.monotonic() - t0 >= 0.04

    run(scenario)


def test_recv_now_and_recv_share_one_buffer() -> None:
    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        data = encode_frame(msg(1)) + encode_frame(msg(2)) + encode_frame(msg(3))
        peer.sendall(data[:-3])  # the third frame is incomplete
        assert ch.recv_now(1.0) == msg(1)
        assert await ch.recv() == msg(2)
        assert ch.recv_now(0.01) is None  # the partial frame stays buffered
        peer.sendall(data[-3:])
        assert await ch.recv() == msg(3)

    run(scenario)


def test_a_waiting_recv_is_not_confused_by_recv_now_taking_the_frame() -> None:
    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        reader = asyncio.ensure_future(ch.recv())
        await asyncio.sleep(0.01)  # parked on the loop
        peer.sendall(encode_frame(msg(1)))
        assert ch.recv_now(1.0) == msg(1)  # taken synchronously, before the loop runs
        peer.sendall(encode_frame(msg(2)))
        assert await reader == msg(2)

    run(scenario)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack(">I", 0), "empty frame"),
        (struct.pack(">I", 2 << 20), "over the 1048576-byte limit"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "undecodable frame"),
        (struct.pack(">I", 2) + msgpack.packb([1]), "not a map"),
        (encode_frame(msg(1))[:4] + msgpack.packb({"t": "done", "id": -1}), "'id'"),
    ],
)
def test_a_bad_frame_is_refused_by_both_paths_and_stays_refused(data: bytes, match: str) -> None:
    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        peer.sendall(data)
        with pytest.raises(WireError, match=match):
            ch.recv_now(1.0)
        with pytest.raises(WireError, match=match):  # the reader task meets it too
            await ch.recv()
        with pytest.raises(WireError, match=match):
            ch.recv_now(0.01)

    run(scenario)


def test_eof_between_frames_is_connection_error_inside_one_is_truncation() -> None:
    async def clean(ch: SocketChannel, peer: socket.socket) -> None:
        peer.sendall(encode_frame(msg(1)))
        peer.shutdown(socket.SHUT_WR)
        assert ch.recv_now(1.0) == msg(1)
        with pytest.raises(ConnectionError, match="closed by peer"):
            ch.recv_now(1.0)
        with pytest.raises(ConnectionError):
            await ch.recv()

    async def cut(ch: SocketChannel, peer: socket.socket) -> None:
        peer.sendall(encode_frame(msg(1, p=b"y" * 50))[:-10])
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(WireError, match="truncated frame"):
            await ch.recv()

    async def cut_header(ch: SocketChannel, peer: socket.socket) -> None:
        peer.sendall(b"\x00\x00")
        peer.shutdown(socket.SHUT_WR)
        with pytest.raises(WireError, match="truncated frame header"):
            ch.recv_now(1.0)

    run(clean)
    run(cut)
    run(cut_header)


def test_close_wakes_a_waiting_recv_and_later_calls_fail() -> None:
    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        reader = asyncio.ensure_future(ch.recv())
        await asyncio.sleep(0.01)
        await ch.close()
        with pytest.raises(ConnectionError, match="closed"):
            await reader
        with pytest.raises(ConnectionError, match="closed"):
            await ch.send(msg(1))
        with pytest.raises(ConnectionError, match="closed"):
            ch.recv_now(0.01)

    run(scenario)


def test_send_waits_for_room_when_the_socket_is_full() -> None:
    big = msg(1, p=b"z" * (4 << 20))  # far more than the socket buffers hold

    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        sending = asyncio.ensure_future(ch.send(big))
        got = bytearray()
        want = len(encode_frame(big))
        peer.setblocking(False)
        while len(got) < want:
            await asyncio.sleep(0)
            try:
                got += peer.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await sending
        assert bytes(got) == encode_frame(big)

    run(scenario, max_frame=8 << 20)


def test_a_send_that_waits_for_room_does_not_strand_a_waiting_recv() -> None:
    """The client's reader task waits in recv() while a call sends: a frame larger than the
    socket's buffer makes the send wait for room too. Both waits must be woken by their own
    event (a shared waiter let the send's overwrite the reader's: the reply then never came)."""

    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = asyncio.ensure_future(ch.recv())
        await asyncio.sleep(0.01)  # the reader waits for the socket to become readable
        big = msg(1, p=b"x" * (4 << 20))
        sender = asyncio.ensure_future(ch.send(big))
        await asyncio.sleep(0.05)
        assert not sender.done()  # the peer reads nothing yet: the send waits for room
        peer.sendall(encode_frame(msg(2)))  # the reply arrives meanwhile
        assert await asyncio.wait_for(reader, 1) == msg(2)
        want = len(encode_frame(big))
        got = 0
        peer.setblocking(False)
        while got < want:  # the peer drains: the send completes
            got += len(await asyncio.get_running_loop().sock_recv(peer, 1 << 20))
        await asyncio.wait_for(sender, 2)

    run(scenario, max_frame=8 << 20)


def _drain_frames(peer: socket.socket, n: int, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Read `n` whole frames from the blocking raw socket."""
    peer.settimeout(timeout)
    f = peer.makefile("rb")
    out = []
    for _ in range(n):
        (size,) = struct.unpack(">I", f.read(4))
        out.append(msgpack.unpackb(f.read(size)))
    return out


def test_a_send_cut_short_closes_the_channel() -> None:
    """Cancelled (a call's timeout) after part of a frame went out: the rest of the stream
    would be read as that frame's tail, so the channel closes; the peer sees EOF."""

    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sender = asyncio.ensure_future(ch.send(msg(1, p=b"x" * (4 << 20))))
        await asyncio.sleep(0.05)
        assert not sender.done()
        sender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sender
        with pytest.raises(ConnectionError, match="closed"):
            await ch.send(msg(2))
        peer.settimeout(2)
        got = 0
        while chunk := peer.recv(1 << 20):
            got += len(chunk)
        assert 0 < got < 4 << 20  # part of the frame, then EOF

    run(scenario, max_frame=8 << 20)


def test_concurrent_sends_go_out_whole_and_in_order() -> None:
    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = [msg(i, p=bytes([i]) * (1 << 20)) for i in (1, 2, 3)]
        sends = [asyncio.ensure_future(ch.send(m)) for m in big]
        got = await asyncio.to_thread(_drain_frames, peer, 3)
        await asyncio.gather(*sends)
        assert got == big

    run(scenario, max_frame=8 << 20)


def test_recv_now_leaves_a_second_frame_to_the_waiting_recv() -> None:
    """Two frames arrive together; recv_now takes the first, the reader task waiting in
    recv() gets the second although the socket will not become readable again."""

    async def scenario(ch: SocketChannel, peer: socket.socket) -> None:
        reader = asyncio.ensure_future(ch.recv())
        await asyncio.sleep(0.01)
        peer.sendall(encode_frame(msg(1)) + encode_frame(msg(2)))
        assert ch.recv_now(1.0) == msg(1)
        assert await asyncio.wait_for(reader, 1) == msg(2)

    run(scenario)
