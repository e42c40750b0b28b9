"""Half-closed connections move and then finish with the normal FIN exchange.

One test per state and family. The CN is the kernel's own TCP in its namespace. To hold a
FIN unacknowledged (FIN_WAIT1, LAST_ACK, CLOSING) the CN drops what arrives from the session
address for a moment (an nft rule in the CN namespace, lifted after the moves). Every case:
data queued before the move arrives byte-exact, EOF comes after it, the connection moves
ed -> id -> ed (the same 4-tuple returns), then ends with FINs both ways and no reset.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from netns_testbed.counters import CnCounters, read_tcp_counters
from netns_testbed.rawmove import RawMover
from netns_testbed.topology import Testbed
from sessmob import netns

STATE = {"ESTABLISHED": 1, "FIN_WAIT1": 4, "FIN_WAIT2": 5, "TIME_WAIT": 6, "CLOSE": 7}
STATE |= {"CLOSE_WAIT": 8, "LAST_ACK": 9, "CLOSING": 11}
D1 = bytes(range(256)) * 40  # 10 KiB
D2 = bytes(reversed(range(256))) * 24


def tcp_state(s: socket.socket) -> int:
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def wait_state(s: socket.socket, name: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while tcp_state(s) != STATE[name]:
        if time.monotonic() > deadline:
            raise AssertionError(f"state {tcp_state(s)} != {name} after {timeout}s")
        time.sleep(0.002)


def read_to_eof(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    out = bytearray()
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            # EOF once, and it stays EOF: nothing may follow it.
            assert s.recv(1 << 16) == b""
            return bytes(out)
        out += chunk


@dataclass
class Flow:
    tb: Testbed
    mover: RawMover
    ed: socket.socket  # the moving end (on ed or id)
    cn: socket.socket
    where: str = "ed"

    def move(self) -> None:
        dst = "id" if self.where == "ed" else "ed"
        self.mover.prepare(dst)
        self.ed, _ = self.mover.move(self.ed, self.where, dst)
        self.where = dst


@contextmanager
def flow(tb: Testbed, family: int) -> Iterator[Flow]:
    mover = RawMover(tb, family)
    cn_addr = tb.hosts["cn"].addr6 if family == socket.AF_INET6 else tb.hosts["cn"].addr4
    mover.place("ed")
    listener = netns.socket_in(tb.ns("cn"), family)
    f: Flow | None = None
    try:
        listener.bind((cn_addr, 0))
        listener.listen()
        ed = netns.socket_in(tb.ns("ed"), family)
        ed.bind((mover.addr, 0))
        ed.connect((cn_addr, listener.getsockname()[1]))
        cn, _ = listener.accept()
        f = Flow(tb, mover, ed, cn)
        yield f
    finally:
        listener.close()
        if f is not None:
            f.ed.close()
            f.cn.close()
            with_addr = mover.devices[f.where]
        else:
            with_addr = mover.devices["ed"]
        try:
            with_addr.addr.delete()
        finally:
            mover.close()


@contextmanager
def cn_drops_from(tb: Testbed, addr: str) -> Iterator[None]:
    """The CN drops everything arriving from `addr` while the block runs."""
    fam = "ip6" if ":" in addr else "ip"
    rules = (
        "table inet smtest {\n chain in {\n  type filter hook input priority -10;\n"
        f"  {fam} saddr {addr} drop\n }}\n}}\n"
    )
    tb.run("cn", ["nft", "-f", "-"], input=rules, text=True)
    try:
        yield
    finally:
        tb.run("cn", ["nft", "delete", "table", "inet", "smtest"])


def cn_resets(tb: Testbed, before: dict[str, int]) -> int:
    with netns.entered(tb.ns("cn")):
        return CnCounters.between(before, read_tcp_counters()).resets


def counters(tb: Testbed) -> dict[str, int]:
    with netns.entered(tb.ns("cn")):
        return read_tcp_counters()


def close_wait(f: Flow) -> Callable[[], None]:
    f.cn.sendall(D1)
    f.cn.shutdown(socket.SHUT_WR)
    wait_state(f.ed, "CLOSE_WAIT")

    def finish() -> None:
        assert read_to_eof(f.ed) == D1
        f.ed.sendall(D2)
        f.ed.shutdown(socket.SHUT_WR)
        assert read_to_eof(f.cn) == D2

    return finish


def fin_wait2(f: Flow) -> Callable[[], None]:
    f.ed.sendall(D1)
    f.ed.shutdown(socket.SHUT_WR)
    wait_state(f.ed, "FIN_WAIT2")

    def finish() -> None:
        assert read_to_eof(f.cn) == D1
        f.cn.sendall(D2)
        f.cn.shutdown(socket.SHUT_WR)
        assert read_to_eof(f.ed) == D2

    return finish


def fin_wait1_sent(f: Flow) -> Callable[[], None]:
    f.ed.sendall(D1)
    f.cn.settimeout(5)
    got = b""
    while len(got) < len(D1):
        got += f.cn.recv(1 << 16)
    assert got == D1
    with cn_drops_from(f.tb, f.mover.addr):
        f.ed.shutdown(socket.SHUT_WR)  # the FIN leaves but the CN never sees it
        time.sleep(0.02)
        wait_state(f.ed, "FIN_WAIT1")
        f.move()
        f.move()
        assert tcp_state(f.ed) == STATE["FIN_WAIT1"]

    def finish() -> None:
        assert read_to_eof(f.cn) == b""  # the FIN arrives once the CN hears us again
        f.cn.sendall(D2)
        f.cn.shutdown(socket.SHUT_WR)
        assert read_to_eof(f.ed) == D2

    return finish


def fin_wait1_unsent(f: Flow) -> Callable[[], None]:
    f.cn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    f.ed.setblocking(False)
    big = D1 * 40
    sent = 0
    deadline = time.monotonic() + 5
    while sent < len(big) and time.monotonic() < deadline:
        try:
            sent += f.ed.send(big[sent:])
        except BlockingIOError:
            time.sleep(0.01)
            if tcp_info_unsent(f.ed) > 0:
                break
    f.ed.setblocking(True)
    f.ed.shutdown(socket.SHUT_WR)  # FIN queued behind never-sent data
    wait_state(f.ed, "FIN_WAIT1")
    assert tcp_info_unsent(f.ed) > 0

    def finish() -> None:
        assert read_to_eof(f.cn, timeout=10) == big[:sent]
        f.cn.shutdown(socket.SHUT_WR)
        assert read_to_eof(f.ed) == b""

    return finish


def tcp_info_unsent(s: socket.socket) -> int:
    import fcntl
    import struct

    siocoutqnsd = 0x894B
    return struct.unpack("i", fcntl.ioctl(s.fileno(), siocoutqnsd, b"\0" * 4))[0]


def last_ack(f: Flow) -> Callable[[], None]:
    f.cn.sendall(D1)
    f.cn.shutdown(socket.SHUT_WR)
    wait_state(f.ed, "CLOSE_WAIT")
    with cn_drops_from(f.tb, f.mover.addr):
        f.ed.shutdown(socket.SHUT_WR)
        wait_state(f.ed, "LAST_ACK")
        f.move()
        f.move()
        assert tcp_state(f.ed) == STATE["LAST_ACK"]

    def finish() -> None:
        assert read_to_eof(f.ed) == D1
        assert read_to_eof(f.cn) == b""

    return finish


def closing(f: Flow) -> Callable[[], None]:
    with cn_drops_from(f.tb, f.mover.addr):
        f.ed.shutdown(socket.SHUT_WR)
        wait_state(f.ed, "FIN_WAIT1")
        f.cn.sendall(D1)
        f.cn.shutdown(socket.SHUT_WR)  # its FIN does not ACK ours: simultaneous close
        wait_state(f.ed, "CLOSING")
        f.move()
        f.move()
        assert tcp_state(f.ed) == STATE["CLOSING"]

    def finish() -> None:
        assert read_to_eof(f.ed) == D1
        assert read_to_eof(f.cn) == b""

    return finish


# State set-ups that move inside themselves (to hold a FIN unacknowledged) say so.
CASES: dict[str, tuple[Callable[[Flow], Callable[[], None]], bool]] = {
    "close_wait": (close_wait, False),
    "fin_wait2": (fin_wait2, False),
    "fin_wait1_fin_sent": (fin_wait1_sent, True),
    "fin_wait1_fin_unsent": (fin_wait1_unsent, False),
    "last_ack": (last_ack, True),
    "closing": (closing, True),
}


@pytest.mark.parametrize("family", [socket.AF_INET6, socket.AF_INET], ids=["ipv6", "ipv4"])
@pytest.mark.parametrize("case", list(CASES))
def test_half_closed_moves_and_finishes(lan: Testbed, case: str, family: int) -> None:
    setup, moves_inside = CASES[case]
    before = counters(lan)
    with flow(lan, family) as f:
        finish = setup(f)
        if not moves_inside:
            state = tcp_state(f.ed)
            f.move()
            assert tcp_state(f.ed) == state, "the move changed the TCP state"
            f.move()
            assert tcp_state(f.ed) == state, "the move back changed the TCP state"
        assert f.where == "ed"
        finish()
    assert cn_resets(lan, before) == 0
