"""The importing RM's prepared import: sockets made from the offer before the freeze, used
only if they are exactly the flows the document brings."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from sessmob.adapters.base import TransferOffer, fresh_sockets
from sessmob.cpu_awake import Hold
from sessmob.exchange import ExchangeDoc, FlowState, UdpState
from sessmob.rm.daemon import RelocationManager, _Incoming
from tests.snapshots import established


def offer(tcp: list[Any], udp: list[Any] | None = None) -> TransferOffer:
    res: dict[str, Any] = {"tcp": {"flows": tcp}}
    if udp is not None:
        res["udp"] = {"flows": udp}
    return TransferOffer("s1", "echo", "ed", res)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fresh_sockets_follow_the_local_address_family() -> None:
    o = offer(
        [
            {"flow": "f0", "local": ["2001:db8:1::100", 7000], "remote": ["2001:db8:1::1", 1]},
            {"flow": "f1", "local": ["192.0.2.100", 7000]},
            {"flow": "f2", "local": ["::ffff:192.0.2.100", 7000]},  # v4-mapped: AF_INET6
        ],
        [{"flow": "u", "local": ["192.0.2.100", 7000]}],
    )
    tcp = fresh_sockets(o, "tcp", socket.SOCK_STREAM)
    udp = fresh_sockets(o, "udp", socket.SOCK_DGRAM)
    try:
        fams = {k: s.family for k, s in tcp.items()}
        assert fams == {"f0": socket.AF_INET6, "f1": socket.AF_INET, "f2": socket.AF_INET6}
        assert all(s.type == socket.SOCK_STREAM for s in tcp.values())
        assert udp["u"].family == socket.AF_INET and udp["u"].type == socket.SOCK_DGRAM
    finally:
        for s in [*tcp.values(), *udp.values()]:
            s.close()
    assert fresh_sockets(offer([]), "tcp", socket.SOCK_STREAM) == {}
    assert fresh_sockets(TransferOffer("s", "t", "ed", {}), "udp", socket.SOCK_DGRAM) == {}


@pytest.mark.parametrize(
    "bad",
    [
        ["not a map"],
        [{"flow": 7, "local": ["192.0.2.1", 1]}],
        [{"flow": "f0", "local": "192.0.2.1"}],
        [{"flow": "f0", "local": []}],
        [{"flow": "f0"}],
        [{"flow": "f0", "local": ["192.0.2.1", 1]}, {"flow": "f0", "local": ["192.0.2.1", 2]}],
    ],
)
def test_odd_offer_entries_are_refused_and_nothing_stays_open(bad: list[Any]) -> None:
    before = fd_count()
    good = {"flow": "ok", "local": ["192.0.2.1", 1]}
    with pytest.raises(ValueError):
        fresh_sockets(offer([good, *bad]), "tcp", socket.SOCK_STREAM)
    assert fd_count() == before


def doc(flows: list[FlowState]) -> ExchangeDoc:
    return ExchangeDoc("s1", "echo", "ed", ["2001:db8:1::100/64"], [], flows)


def tcp_flow(fid: str, family: int = socket.AF_INET6) -> FlowState:
    local, remote = (
        (("2001:db8:1::100", 7000), ("2001:db8:1::1", 40000))
        if family == socket.AF_INET6
        else (("192.0.2.100", 7000), ("192.0.2.1", 40000))
    )
    return FlowState(fid, "tcp", tcp=established(family, local, remote))


def udp_flow(fid: str) -> FlowState:
    st = UdpState(socket.AF_INET6, ("2001:db8:1::100", 7000), None, {}, [])
    return FlowState(fid, "udp", udp=st)


def test_prepared_sockets_are_used_only_for_exactly_the_documents_flows() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(60, lambda: None)
        made = {
            "f0": ("tcp", socket.socket(socket.AF_INET6, socket.SOCK_STREAM)),
            "u": ("udp", socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)),
        }
        try:
            inc = _Incoming(offer([]), handle, float("inf"), None, Hold(None), prepared=made)
            fits = RelocationManager._prepared_for
            assert fits(inc, doc([tcp_flow("f0"), udp_flow("u")]))
            assert not fits(inc, doc([tcp_flow("f0")]))  # a flow went away
            assert not fits(inc, doc([tcp_flow("f0"), udp_flow("u"), tcp_flow("f1")]))
            assert not fits(inc, doc([tcp_flow("f0", socket.AF_INET), udp_flow("u")]))
            assert not fits(inc, doc([tcp_flow("u"), udp_flow("f0")]))  # kinds swapped
            empty = _Incoming(offer([]), handle, float("inf"), None, Hold(None))
            assert not fits(empty, doc([]))  # nothing prepared
        finally:
            handle.cancel()
            for _, s in made.values():
                s.close()

    asyncio.run(main())


def test_one_dial_per_device_and_a_dropped_channel_is_closed(monkeypatch: Any) -> None:
    """Concurrent moves to one device share one connect; a channel dropped after a failure is
    closed (so ID aborts what it held) and only replaces itself, not a newer one."""
    import sessmob.rm.daemon as daemon

    class FakePeer:
        def __init__(self) -> None:
            self.closed = False

        async def close(self) -> None:
            self.closed = True

    dials: list[FakePeer] = []

    async def connect(*args: Any, **kw: Any) -> FakePeer:
        await asyncio.sleep(0.01)  # a connect takes a while: both callers are inside it
        dials.append(FakePeer())
        return dials[-1]

    monkeypatch.setattr(daemon.PeerClient, "connect", connect)
    rm = RelocationManager.__new__(RelocationManager)
    rm.cfg = type("Cfg", (), {"devices": {"id": type("D", (), {"host": "h", "port": 1})()},
                              "peer_timeout": 1.0})()  # fmt: skip
    rm.peers, rm._dialing, rm.transport = {}, {}, None

    async def main() -> None:
        a, b = await asyncio.gather(rm._peer("id"), rm._peer("id"))
        assert a is b and len(dials) == 1
        await rm._drop_peer("id", a)  # type: ignore[arg-type]
        assert a.closed and "id" not in rm.peers
        c = await rm._peer("id")
        await rm._drop_peer("id", a)  # type: ignore[arg-type]  # stale: c stays
        assert rm.peers["id"] is c and not c.closed and len(dials) == 2

    asyncio.run(main())


def test_the_loop_is_held_for_a_transfer_only_when_no_other_move_runs() -> None:
    from sessmob.session import ServiceSession, SessionState

    async def main() -> None:
        handle = asyncio.get_running_loop().call_later(60, lambda: None)
        rm = RelocationManager.__new__(RelocationManager)
        rm.sessions, rm.incoming = {}, {}
        try:
            assert rm.may_hold_loop()
            rm.sessions["a"] = ServiceSession("a", "echo")
            assert rm.may_hold_loop()  # a session at rest
            rm.sessions["a"].state = SessionState.MOVING
            assert not rm.may_hold_loop()  # it is being exported
            rm.sessions["a"].state = SessionState.ACTIVE
            rm.incoming["r"] = _Incoming(offer([]), handle, float("inf"), None, Hold(None))
            assert rm.may_hold_loop()  # only reserved
            rm.incoming["r"].busy = True
            assert not rm.may_hold_loop()  # another import is under way
        finally:
            handle.cancel()

    asyncio.run(main())
