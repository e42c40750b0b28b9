"""Interface R end to end on 127.0.0.1: PeerClient (ED) against serve_peers (ID).

One test per case of the protocol: the success path, a refusal, a failing handler, an unknown
or foreign reservation, the commit point (no abort after activation), a timeout, a peer that
vanishes mid-call, and hostile bytes that must close only their own channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import msgpack
import pytest

import sessmob.rm.peer as peer_mod
from sessmob.adapters.base import Refused, TransferOffer
from sessmob.rm.peer import (
    PROTOCOL_VERSION,
    PeerClient,
    PeerError,
    PeerLost,
    PeerTimeout,
    Reservation,
    serve_peers,
)
from sessmob.rm.transport import PlainTransport
from sessmob.rm.wire import WireError, encode_frame, read_frame

OFFER = TransferOffer(
    session_id="s1",
    session_type="echo",
    source="ed",
    resources={"net_addr": {"address": "2001:db8::10/64"}, "tcp": {"flows": 2, "bytes": 4096}},
)


class FakeHandler:
    """Records every call; `fail` maps a method name to the exception it raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, BaseException] = {}
        self.delay: dict[str, float] = {}
        self.timings: Any = {"set_state": 0.25, "resume": 0.5}
        self.next_rid = 0
        self.hold_ok = True

    async def _enter(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.delay:
            await asyncio.sleep(self.delay[name])
        if name in self.fail:
            raise self.fail[name]

    async def check_preconditions(self, offer: TransferOffer, peer: str | None) -> Reservation:
        await self._enter("check", offer, peer)
        self.next_rid += 1
        return Reservation(f"r{self.next_rid}", 3.0)

    async def initiate_transfer(self, reservation_id: str, document: bytes) -> None:
        await self._enter("transfer", reservation_id, document)

    async def activate_session(self, reservation_id: str) -> dict[str, float]:
        await self._enter("activate", reservation_id)
        return self.timings

    async def abort(self, reservation_id: str, reason: str) -> None:
        await self._enter("abort", reservation_id, reason)

    def may_hold_loop(self) -> bool:
        return self.hold_ok

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


Scenario = Callable[[FakeHandler, int], Awaitable[None]]


def run(scenario: Scenario, handler: FakeHandler | None = None) -> FakeHandler:
    """Serve `handler` on a free loopback port and run the scenario against it (10 s cap)."""
    h = handler or FakeHandler()

    async def main() -> None:
        server = cast(asyncio.Server, await serve_peers(PlainTransport(), "127.0.0.1", 0, h))
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(scenario(h, port), 10)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    return h


async def client(port: int, **kw: Any) -> PeerClient:
    return await PeerClient.connect(PlainTransport(), "127.0.0.1", port, **kw)


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def raw(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    """Frames the server sent before closing; fails if it keeps the channel open."""
    frames = []
    while True:
        try:
            frames.append(await asyncio.wait_for(read_frame(reader), 2))
        except ConnectionError:
            return frames
        except TimeoutError:
            pytest.fail("server kept a channel open after a bad frame")


# -- the success path ------------------------------------------------------------------------


def test_check_transfer_activate_success() -> None:
    doc = bytes(range(256)) * 4096  # 1 MiB exchange document

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            assert res == Reservation("r1", 3.0)
            await peer.initiate_transfer(res.reservation_id, doc)
            ms = await peer.activate_session(res.reservation_id)
            assert ms == {"set_state": 0.25, "resume": 0.5}

    h = run(scenario)
    assert h.names() == ["check", "transfer", "activate"]
    assert h.calls[0][1] == OFFER and h.calls[0][2] is None  # plain transport: no peer name
    assert h.calls[1] == ("transfer", "r1", doc)
    assert h.calls[2] == ("activate", "r1")


def test_transfer_and_activate_in_one_round_trip() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            ms = await peer.transfer_and_activate(res.reservation_id, b"doc")
            assert ms == {"set_state": 0.25, "resume": 0.5}

    h = run(scenario)
    assert h.names() == ["check", "transfer", "activate"]


def test_transfer_and_activate_does_not_activate_after_a_failed_set_state() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            h.fail["transfer"] = ValueError("exchange document: unknown version 9")
            with pytest.raises(PeerError) as ei:
                await peer.transfer_and_activate(res.reservation_id, b"doc")
            assert ei.value.step == "InitiateSessionTransfer"
            assert "unknown version 9" in ei.value.reason
            await peer.abort(res.reservation_id, "transfer failed")

    h = run(scenario)
    assert h.names() == ["check", "transfer", "abort"]


def test_freeze_window_messages_are_small() -> None:
    # Everything but the document itself stays within a few dozen bytes.
    transfer = encode_frame({"t": "transfer", "id": 3, "rid": "r1234567", "p": b""})
    activate = encode_frame({"t": "activate", "id": 4, "rid": "r1234567"})
    assert len(transfer) < 40 and len(activate) < 40


def test_an_offer_that_cannot_be_encoded_fails_locally_and_the_channel_lives_on() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            bad = TransferOffer("s1", "echo", "ed", {"tcp": {"fds": {1, 2}}})  # a set
            with pytest.raises(WireError, match="CheckPreconditions: cannot encode"):
                await peer.check_preconditions(bad)
            assert (await peer.check_preconditions(OFFER)).reservation_id == "r1"

    h = run(scenario)
    assert h.names().count("check") == 1  # the bad offer never left ED


# -- refusals and failures ---------------------------------------------------------------------


def test_refusal_becomes_peer_error_with_step_adapter_and_reason() -> None:
    h = FakeHandler()
    h.fail["check"] = Refused("net_addr", "2001:db8::10 is used by pid 42 (nc)")

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            with pytest.raises(PeerError) as ei:
                await peer.check_preconditions(OFFER)
            e = ei.value
            assert e.step == "CheckPreconditions"
            assert e.refused and e.adapter == "net_addr"
            assert e.reason == "net_addr: 2001:db8::10 is used by pid 42 (nc)"
            assert "refused" in str(e)

    run(scenario, h)


def test_refusal_at_transfer_names_that_step() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            h.fail["transfer"] = Refused("rm", "reservation r1 expired")
            with pytest.raises(PeerError) as ei:
                await peer.initiate_transfer(res.reservation_id, b"doc")
            assert ei.value.step == "InitiateSessionTransfer"
            assert ei.value.refused and ei.value.reason == "rm: reservation r1 expired"

    run(scenario)


def test_handler_exception_becomes_error_reply_and_the_channel_lives_on() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            h.fail["transfer"] = RuntimeError("tcp: restore failed (EADDRINUSE)")
            with pytest.raises(PeerError) as ei:
                await peer.initiate_transfer(res.reservation_id, b"doc")
            assert ei.value.step == "InitiateSessionTransfer"
            assert not ei.value.refused
            assert ei.value.reason == "RuntimeError: tcp: restore failed (EADDRINUSE)"
            await peer.abort(res.reservation_id, "SetState failed")  # same channel still works

    h = run(scenario)
    assert h.names() == ["check", "transfer", "abort"]
    assert h.calls[-1] == ("abort", "r1", "SetState failed")


def test_activation_failure_names_activate_session() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            await peer.initiate_transfer(res.reservation_id, b"doc")
            h.fail["activate"] = OSError(99, "Cannot assign requested address")
            with pytest.raises(PeerError) as ei:
                await peer.activate_session(res.reservation_id)
            assert ei.value.step == "ActivateSession"
            assert "Cannot assign requested address" in ei.value.reason

    run(scenario)


def test_unknown_reservation_gets_an_error_reply_without_reaching_the_handler() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            for call in (
                peer.initiate_transfer("nope", b"doc"),
                peer.activate_session("nope"),
                peer.abort("nope", "why not"),
            ):
                with pytest.raises(PeerError, match="unknown reservation 'nope'"):
                    await call

    h = run(scenario)
    assert h.calls == []


def test_a_reservation_belongs_to_the_channel_that_made_it() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as a, await client(port) as b:
            res = await a.check_preconditions(OFFER)
            with pytest.raises(PeerError, match="unknown reservation"):
                await b.initiate_transfer(res.reservation_id, b"doc")
            with pytest.raises(PeerError, match="unknown reservation"):
                await b.activate_session(res.reservation_id)
            await a.initiate_transfer(res.reservation_id, b"doc")
        await until(lambda: "abort" in h.names(), "abort after a closed")

    h = run(scenario)
    assert h.names() == ["check", "transfer", "abort"]  # a closed before activating


def test_no_abort_after_the_commit_point() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            await peer.initiate_transfer(res.reservation_id, b"doc")
            await peer.activate_session(res.reservation_id)
            with pytest.raises(PeerError, match="already activated") as ei:
                await peer.abort(res.reservation_id, "too late")
            assert ei.value.step == "Abort"
            with pytest.raises(PeerError, match="already activated"):
                await peer.activate_session(res.reservation_id)
        # a new channel (the old reply lost) learns the same
        async with await client(port) as again:
            with pytest.raises(PeerError, match="already activated"):
                await again.abort(res.reservation_id, "was it activated?")

    h = run(scenario)
    assert "abort" not in h.names()


@pytest.mark.parametrize("outcome", ["activated", "failed"])
def test_an_abort_from_another_channel_waits_for_the_running_transfer(outcome: str) -> None:
    """ED, its reply overdue, asks again on a new channel while ID is still importing: the
    answer must be the transfer's outcome, not an abort racing it."""

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as a, await client(port) as b:
            res = await a.check_preconditions(OFFER)
            h.delay["transfer"] = 0.3
            if outcome == "failed":
                h.fail["activate"] = RuntimeError("resume failed")
            moving = asyncio.ensure_future(a.transfer_and_activate(res.reservation_id, b"doc"))
            await until(lambda: "transfer" in h.names(), "the transfer to start")
            if outcome == "activated":
                with pytest.raises(PeerError, match="already activated"):
                    await b.abort(res.reservation_id, "overdue")
                assert await moving == h.timings
            else:
                await b.abort(res.reservation_id, "overdue")
                with pytest.raises(PeerError, match="resume failed"):
                    await moving

    h = run(scenario)
    names = h.names()
    assert names[:3] == ["check", "transfer", "activate"], names
    assert names.count("abort") == (0 if outcome == "activated" else 1)


def test_a_reply_lost_after_activation_closes_the_channel_and_an_abort_learns_it() -> None:
    """The fault hook ReplyLost: no reply, the channel closes, the reservation is activated."""

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as a:
            res = await a.check_preconditions(OFFER)
            h.fail["activate"] = peer_mod.ReplyLost("lost")
            with pytest.raises(PeerLost):
                await a.transfer_and_activate(res.reservation_id, b"doc")
        async with await client(port) as b:
            with pytest.raises(PeerError, match="already activated"):
                await b.abort(res.reservation_id, "was it activated?")

    h = run(scenario)
    assert "abort" not in h.names()


def test_closing_the_channel_before_activation_aborts_its_reservations() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        peer = await client(port)
        await peer.check_preconditions(OFFER)  # r1: only reserved
        res2 = await peer.check_preconditions(OFFER)  # r2: transferred
        await peer.initiate_transfer(res2.reservation_id, b"doc")
        res3 = await peer.check_preconditions(OFFER)  # r3: activated, must stay
        await peer.initiate_transfer(res3.reservation_id, b"doc")
        await peer.activate_session(res3.reservation_id)
        await peer.close()
        await until(lambda: h.names().count("abort") == 2, "aborts after close")

    h = run(scenario)
    aborted = sorted(c[1] for c in h.calls if c[0] == "abort")
    assert aborted == ["r1", "r2"]


def test_unsupported_protocol_version_is_refused_clearly() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with raw(port) as (reader, writer):
            writer.write(
                encode_frame(
                    {
                        "t": "check",
                        "id": 1,
                        "v": PROTOCOL_VERSION + 1,
                        "offer": {
                            "session_id": "s",
                            "session_type": "echo",
                            "source": "ed",
                            "resources": {},
                        },
                    }
                )
            )
            reply = await read_frame(reader)
            assert reply["t"] == "error" and reply["id"] == 1
            assert "version" in reply["reason"] and reply["step"] == "CheckPreconditions"

    h = run(scenario)
    assert h.calls == []


def test_odd_timings_after_commit_still_report_success() -> None:
    h = FakeHandler()
    h.timings = {"ok": 1.5, "bad": "x", "flag": True}

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            await peer.initiate_transfer(res.reservation_id, b"doc")
            assert await peer.activate_session(res.reservation_id) == {"ok": 1.5}

    run(scenario, h)


# -- time and loss -----------------------------------------------------------------------------


def test_a_slow_peer_times_out_with_the_step_named() -> None:
    h = FakeHandler()
    h.delay["activate"] = 5.0

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port, call_timeout=0.2) as peer:
            res = await peer.check_preconditions(OFFER)
            await peer.initiate_transfer(res.reservation_id, b"doc")
            t0 = time.monotonic()
            with pytest.raises(TimeoutError) as ei:
                await peer.activate_session(res.reservation_id)
            assert time.monotonic() - t0 < 1.0
            assert isinstance(ei.value, PeerTimeout) and ei.value.step == "ActivateSession"
            assert "ActivateSession" in str(ei.value)
            # a per-call timeout overrides the client's
            h.delay["abort"] = 0.3
            with pytest.raises(PeerTimeout):
                await peer.abort(res.reservation_id, "x", timeout=0.05)

    run(scenario, h)


def test_late_reply_after_a_timeout_is_dropped_not_misdelivered() -> None:
    h = FakeHandler()
    h.delay["transfer"] = 0.3

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            with pytest.raises(PeerTimeout):
                await peer.initiate_transfer(res.reservation_id, b"doc", timeout=0.05)
            del h.delay["transfer"]
            # the late "done" of the transfer must not answer this activate
            h.timings = {"marker": 7.0}
            assert await peer.activate_session(res.reservation_id) == {"marker": 7.0}

    run(scenario, h)


def test_peer_disappearing_mid_call_raises_connection_error_with_the_step() -> None:
    async def vanish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)  # take the request, then hang up without a reply
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(vanish, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            peer = await client(port)
            with pytest.raises(ConnectionError) as ei:
                await peer.check_preconditions(OFFER)
            assert isinstance(ei.value, PeerLost) and ei.value.step == "CheckPreconditions"
            # once lost, every later call fails at once, naming its own step
            with pytest.raises(PeerLost) as ei2:
                await peer.activate_session("r1")
            assert ei2.value.step == "ActivateSession"
            await peer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_unreachable_peer_is_a_connection_error_naming_connect() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now

    async def main() -> None:
        with pytest.raises(ConnectionError) as ei:
            await client(port)
        assert isinstance(ei.value, PeerLost) and ei.value.step == "Connect"
        assert f"127.0.0.1:{port}" in str(ei.value)

    asyncio.run(main())


def test_an_unexpected_reply_closes_the_client_channel() -> None:
    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_frame(reader)
        writer.write(encode_frame({"t": "activated", "id": req["id"], "ms": {}}))
        await writer.drain()
        await reader.read()  # until the client hangs up

    async def main() -> None:
        server = await asyncio.start_server(liar, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            peer = await client(port)
            with pytest.raises(PeerLost, match="protocol violation"):
                await peer.check_preconditions(OFFER)  # "activated" answers a check
            assert peer.closed
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_malformed_reply_frame_fails_the_pending_call() -> None:
    async def garbler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        server = await asyncio.start_server(garbler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            peer = await client(port)
            with pytest.raises(PeerLost, match="protocol violation"):
                await peer.check_preconditions(OFFER)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 10))


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ({"t": "error", "id": 0, "step": "R", "reason": "bye"}, "peer closed the channel: bye"),
        ({"t": "hello", "id": 1}, "protocol violation"),
        (None, "protocol violation"),  # a malformed frame
    ],
)
def test_trouble_met_while_waiting_on_the_socket_fails_the_call_at_once(
    answer: dict[str, Any] | None, match: str
) -> None:
    """Inside the freeze window the transfer's reply is read off the socket (no loop trip);
    a reply there that ends the channel must fail the call then, not at its timeout."""

    # The peer answers from its own thread: the client holds its loop while it waits on
    # the socket, so a server on that loop could not answer in time.
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            (n,) = struct.unpack(">I", _recv_exactly(conn, 4))
            _recv_exactly(conn, n)  # the transfer request
            frame = (
                struct.pack(">I", 3) + b"\xc1\xc1\xc1" if answer is None else encode_frame(answer)
            )
            conn.sendall(frame)
            conn.recv(1)  # until the client hangs up

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    async def main() -> None:
        peer = await client(port, call_timeout=30)
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match=match):
            await peer.transfer_and_activate("r1", b"doc")
        assert time.monotonic() - t0 < 1.0
        assert peer.closed
        # Its socket is closed too (the peer sees EOF): even a reader that never ran.
        await until(lambda: not server.is_alive(), "the client to hang up")

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        server.join(5)
        lsock.close()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "client hung up early"
        data += chunk
    return data


# -- hostile bytes -----------------------------------------------------------------------------

GOOD_OFFER = {"session_id": "s", "session_type": "echo", "source": "ed", "resources": {}}
HOSTILE: dict[str, bytes] = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "oversized": struct.pack(">I", 0xFFFFFFF0) + b"x" * 16,
    "empty": struct.pack(">I", 0),
    "not-a-map": struct.pack(">I", 3) + msgpack.packb([1, 2]),
    "undecodable": struct.pack(">I", 2) + b"\xc1\xc1",
    "unknown-type": encode_frame({"t": "format-disk", "id": 1}),
    "reply-as-request": encode_frame({"t": "done", "id": 1}),
    "id-zero": encode_frame({"t": "activate", "id": 0, "rid": "r1"}),
    "no-offer": encode_frame({"t": "check", "id": 1, "v": PROTOCOL_VERSION}),
    "offer-wrong-types": encode_frame(
        {"t": "check", "id": 1, "v": PROTOCOL_VERSION, "offer": {**GOOD_OFFER, "source": 5}}
    ),
    "resources-not-maps": encode_frame(
        {
            "t": "check",
            "id": 1,
            "v": PROTOCOL_VERSION,
            "offer": {**GOOD_OFFER, "resources": {"a": 1}},
        }
    ),
    "rid-not-str": encode_frame({"t": "activate", "id": 1, "rid": 17}),
    "transfer-without-payload": encode_frame({"t": "transfer", "id": 1, "rid": "r1"}),
    "abort-without-reason": encode_frame({"t": "abort", "id": 1, "rid": "r1"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_close_only_their_own_channel(name: str) -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as good:
            res = await good.check_preconditions(OFFER)
            async with raw(port) as (reader, writer):
                writer.write(HOSTILE[name])
                await writer.drain()
                frames = await closed_by_server(reader)
            # the server said why (where it could still frame a reply) and closed the channel
            assert all(f["t"] == "error" and f["id"] == 0 for f in frames)
            # the established channel and new ones keep working
            await good.initiate_transfer(res.reservation_id, b"doc")
            assert await good.activate_session(res.reservation_id)
            async with await client(port) as fresh:
                await fresh.check_preconditions(OFFER)

    h = run(scenario)
    assert h.names()[:3] == ["check", "transfer", "activate"]


def test_error_frame_tells_the_peer_why_its_channel_closed() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        async with raw(port) as (reader, writer):
            writer.write(HOSTILE["unknown-type"])
            frames = await closed_by_server(reader)
        assert len(frames) == 1 and "format-disk" in frames[0]["reason"]

    run(scenario)


def test_a_truncated_frame_then_hangup_does_not_disturb_the_server() -> None:
    async def scenario(h: FakeHandler, port: int) -> None:
        for cut in (2, 10):
            async with raw(port) as (_reader, writer):
                frame = encode_frame({"t": "check", "id": 1, "v": 1, "offer": GOOD_OFFER})
                writer.write(frame[:cut])
                await writer.drain()
        async with await client(port) as peer:
            assert (await peer.check_preconditions(OFFER)).reservation_id == "r1"

    run(scenario)


def test_many_raw_sockets_sending_random_bytes_do_not_stop_the_server() -> None:
    import random

    rng = random.Random(7)

    async def scenario(h: FakeHandler, port: int) -> None:
        for _ in range(50):
            async with raw(port) as (_reader, writer):
                writer.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
                await writer.drain()
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            await peer.transfer_and_activate(res.reservation_id, b"doc")

    h = run(scenario)
    assert h.names()[-2:] == ["transfer", "activate"]


# -- ID waits on the socket for the transfer after a reservation ------------------------------


def _spy_transfer_now(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """What each wait after a reservation returned: the message type, None for nothing, or
    the exception's name."""
    seen: list[str | None] = []
    real = peer_mod._PeerSession._transfer_now

    def spy(self: Any) -> dict[str, Any] | None:
        try:
            msg = real(self)
        except Exception as e:
            seen.append(type(e).__name__)
            raise
        seen.append(None if msg is None else msg["t"])
        return msg

    monkeypatch.setattr(peer_mod._PeerSession, "_transfer_now", spy)
    return seen


@pytest.mark.parametrize("other_move", [False, True])
def test_the_transfer_after_a_reservation_is_taken_straight_off_the_socket(
    monkeypatch: pytest.MonkeyPatch, other_move: bool
) -> None:
    """The client runs on its own thread and loop: the server holds its loop while it waits —
    except while the handler runs another move, whose window the held loop would stretch."""
    seen = _spy_transfer_now(monkeypatch)

    async def move(port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            await peer.transfer_and_activate(res.reservation_id, b"doc")

    async def scenario(h: FakeHandler, port: int) -> None:
        h.hold_ok = not other_move
        await asyncio.to_thread(asyncio.run, move(port))

    h = run(scenario)
    assert seen == ([] if other_move else ["transfer"])  # [] : it came through the loop
    assert h.names() == ["check", "transfer", "activate"]


def test_a_transfer_later_than_the_wait_goes_through_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _spy_transfer_now(monkeypatch)
    monkeypatch.setattr(peer_mod, "TRANSFER_WAIT", 0.001)

    async def scenario(h: FakeHandler, port: int) -> None:
        async with await client(port) as peer:
            res = await peer.check_preconditions(OFFER)
            await asyncio.sleep(0.05)
            await peer.transfer_and_activate(res.reservation_id, b"doc")

    h = run(scenario)
    assert seen == [None]
    assert h.names() == ["check", "transfer", "activate"]


@pytest.mark.parametrize("after", ["bad-frame", "hang-up"])
def test_trouble_met_while_waiting_for_the_transfer_ends_only_that_channel(
    monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    """A bad frame or a hang-up met while waiting on the socket for the transfer: the channel
    ends (with the reason, where it can still be framed) and its reservation is aborted. The
    raw client is a blocking socket on another thread, so it is met inside the wait."""
    seen = _spy_transfer_now(monkeypatch)

    def misbehave(port: int) -> list[dict[str, Any]]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            offer = {"t": "check", "id": 1, "v": PROTOCOL_VERSION, "offer": GOOD_OFFER}
            s.sendall(encode_frame(offer))
            f = s.makefile("rb")
            frames = [msgpack.unpackb(f.read(struct.unpack(">I", f.read(4))[0]))]
            if after == "hang-up":
                return frames
            s.sendall(HOSTILE["undecodable"])
            while head := f.read(4):
                frames.append(msgpack.unpackb(f.read(struct.unpack(">I", head)[0])))
            return frames

    async def scenario(h: FakeHandler, port: int) -> None:
        frames = await asyncio.to_thread(misbehave, port)
        assert frames[0]["t"] == "reserved"
        if after == "bad-frame":
            assert [f["t"] for f in frames[1:]] == ["error"]
            assert "undecodable" in frames[1]["reason"]
        await until(lambda: "abort" in h.names(), "the reservation aborted")
        async with await client(port) as fresh:  # the server goes on
            await fresh.check_preconditions(OFFER)

    h = run(scenario)
    assert h.names()[:2] == ["check", "abort"]
    # met inside the wait; the fresh client's wait ends empty (it shares the server's loop)
    assert seen == ["WireError" if after == "bad-frame" else "ConnectionError", None]


def test_a_server_started_with_earlier_activations_still_reports_them() -> None:
    """A restarted RM (sessmob.rm.journal) answers an Abort of what it activated before."""
    h = FakeHandler()

    async def main() -> None:
        server = cast(
            asyncio.Server,
            await serve_peers(PlainTransport(), "127.0.0.1", 0, h, [("r-old", None)]),
        )
        port = server.sockets[0].getsockname()[1]
        try:
            async with await client(port) as peer:
                with pytest.raises(PeerError, match="already activated"):
                    await peer.abort("r-old", "was it activated?")
                with pytest.raises(PeerError, match="unknown reservation"):
                    await peer.activate_session("r-old")  # nothing to activate here
                with pytest.raises(PeerError, match="unknown reservation"):
                    await peer.abort("r-other", "and this one?")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert h.calls == []
