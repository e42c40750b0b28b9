"""sessmob.tcp_repair against the real kernel, on loopback in a private network namespace.

Every test runs in a network namespace of its own: the test thread unshare()s a new one (so it
has no name, nothing to clean up, and it vanishes with its last socket) and returns to its
original namespace afterwards. Both ends of each connection live there, so /proc/net/snmp
counts what either end does: OutRsts (every RST sent) must stay unchanged, while EstabResets
also counts each silent release (an ESTABLISHED socket going to CLOSE in repair mode sends
nothing, but is a local ESTABLISHED -> CLOSE transition) and is checked against that count.

Data "in flight and lost" is made with a drop-everything socket filter on the receiver (TCP
runs socket filters before it processes or ACKs a segment). The same filters isolate a flow
while it is frozen, as the real move isolates it by removing the address.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import errno
import fcntl
import gc
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pytest

from sessmob import netns
from sessmob.tcp_repair import (
    BatchError,
    NotRepairable,
    SnapshotError,
    TcpRepairError,
    TcpSnapshot,
    activate,
    dump,
    freeze,
    release,
    restore,
    restore_into_many,
    restore_many,
    resume,
)
from sessmob.tcp_snapshot import F_NONBLOCK, F_V4MAPPED

CLONE_NEWNET = 0x40000000
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B
SIOCGSKNS = 0x894C
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_BUF_LOCK = 72
TCP_REPAIR_WINDOW = 29
IPPROTO_MPTCP = 262
TIMEOUT = 8.0  # seconds; a restored socket retransmits lost data only after its 3 s RTO

TCP_STATES = {"ESTABLISHED": 1, "SYN_SENT": 2, "FIN_WAIT1": 4, "FIN_WAIT2": 5, "CLOSE": 7}
TCP_STATES |= {"CLOSE_WAIT": 8, "LAST_ACK": 9, "LISTEN": 10}

_libc = ctypes.CDLL(None, use_errno=True)


# -- namespace ----------------------------------------------------------------------------------


def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack_from("H", ifr, 16)[0]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _ns_inode(path: str = "/proc/thread-self/ns/net") -> int:
    return os.stat(path).st_ino


@pytest.fixture(autouse=True)
def private_netns() -> Iterator[None]:
    """Put the test thread into a fresh network namespace with loopback up."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            pytest.skip(f"cannot create a network namespace: unshare: {os.strerror(err)}")
        try:
            _lo_up()
            yield
        finally:
            netns.setns(home)
    finally:
        os.close(home)


@pytest.fixture
def closer() -> Iterator[Callable[[socket.socket], socket.socket]]:
    """Register sockets to close at the end of the test (also when it fails)."""
    socks: list[socket.socket] = []

    def keep(s: socket.socket) -> socket.socket:
        socks.append(s)
        return s

    yield keep
    for s in socks:
        s.close()


# -- socket helpers -----------------------------------------------------------------------------


def _ioctl_int(s: socket.socket, req: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), req, buf)
    return buf[0]


def inq(s: socket.socket) -> int:
    return _ioctl_int(s, SIOCINQ)


def outq(s: socket.socket) -> int:
    return _ioctl_int(s, SIOCOUTQ)


def unsent(s: socket.socket) -> int:
    return _ioctl_int(s, SIOCOUTQNSD)


def tcp_state(s: socket.socket) -> int:
    return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def is_frozen(s: socket.socket) -> bool:
    """TCP_REPAIR_WINDOW is readable only in repair mode (EPERM otherwise)."""
    try:
        s.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
    except PermissionError:
        return False
    return True


_DROP_PROG = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # ret #0


def drop_all(s: socket.socket) -> None:
    """Drop every segment arriving at s before TCP sees it (as if lost on the way)."""
    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(_DROP_PROG))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def undrop(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


def wait_until(pred: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def silent(s: socket.socket, seconds: float) -> bool:
    """Nothing arrives at s — no data, no EOF (FIN), no error (RST) — for `seconds`."""
    r, _, x = select.select([s], [], [s], seconds)
    return not r and not x and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def tcp_counters() -> dict[str, int]:
    with open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))


def assert_no_resets(before: dict[str, int], silent_closes: int) -> None:
    after = tcp_counters()
    assert after["OutRsts"] == before["OutRsts"], "a RST was sent"
    assert after["EstabResets"] - before["EstabResets"] == silent_closes
    assert after["AttemptFails"] == before["AttemptFails"]
    # No segment refused as malformed (e.g. activate's hand-built ACK with a bad checksum).
    for name in ("InErrs", "InCsumErrors"):
        assert after[name] == before[name], name


KINDS = {
    # kind: (family of both sockets, listen address, connect address)
    "ipv4": (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
    "ipv6": (socket.AF_INET6, "::1", "::1"),
    "v4mapped": (socket.AF_INET6, "::", "::ffff:127.0.0.1"),  # dual-stack listener
}


@dataclass
class Conn:
    """A loopback connection: `a` is the side to be moved, `b` its peer."""

    listener: socket.socket
    a: socket.socket
    b: socket.socket
    kind: str


def connect_pair(
    keep: Callable[[socket.socket], socket.socket],
    kind: str = "ipv4",
    a_is_server: bool = False,
    peer_rcvbuf: int = 0,
) -> Conn:
    family, listen_at, connect_to = KINDS[kind]
    lsock = keep(socket.socket(family, socket.SOCK_STREAM))
    if family == socket.AF_INET6:
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    csock = keep(socket.socket(family, socket.SOCK_STREAM))
    if peer_rcvbuf:  # set before the handshake: it fixes the window scale
        (csock if a_is_server else lsock).setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf
        )
    lsock.bind((listen_at, 0))
    lsock.listen(8)
    csock.connect((connect_to, lsock.getsockname()[1]))
    ssock = keep(lsock.accept()[0])
    a, b = (ssock, csock) if a_is_server else (csock, ssock)
    return Conn(lsock, a, b, kind)


# -- verifiable streams -------------------------------------------------------------------------

_PERIOD = 1 << 20
_PATTERNS = {  # one period twice over: a slice may start anywhere in the first
    seed: bytes(((i * 131) ^ (i >> 8) ^ (i >> 16) ^ seed) & 0xFF for i in range(_PERIOD)) * 2
    for seed in (0x5A, 0xC3)
}
A2B, B2A = 0x5A, 0xC3  # the two directions


def expected(direction: int, offset: int, n: int) -> bytes:
    out = []
    while n:
        start = offset % _PERIOD
        k = min(n, _PERIOD)
        out.append(_PATTERNS[direction][start : start + k])
        offset += k
        n -= k
    return b"".join(out)


@dataclass
class Stream:
    """Bytes of one direction: how far the writer and the reader have come."""

    direction: int
    sent: int = 0
    received: int = 0

    def send(self, s: socket.socket, n: int, until_full: bool = False) -> int:
        """Send n pattern bytes (waiting for room), or as many as fit if until_full."""
        done = 0
        while done < n:
            chunk = expected(self.direction, self.sent, min(n - done, 65536))
            try:
                k = s.send(chunk, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if until_full:
                    break
                if not select.select([], [s], [], TIMEOUT)[1]:
                    raise TimeoutError(f"send stalled at offset {self.sent}") from None
                continue
            self.sent += k
            done += k
        return done

    def expect(self, s: socket.socket, n: int) -> None:
        """Receive exactly n bytes and check they are the next ones of the stream."""
        end = self.received + n
        while self.received < end:
            if not select.select([s], [], [], TIMEOUT)[0]:
                raise AssertionError(
                    f"timed out at offset {self.received}, {end - self.received} bytes missing"
                )
            data = s.recv(min(end - self.received, 1 << 16), socket.MSG_DONTWAIT)
            assert data, f"EOF at offset {self.received}"
            want = expected(self.direction, self.received, len(data))
            if data != want:
                bad = next(i for i in range(len(data)) if data[i] != want[i])
                raise AssertionError(f"wrong byte at offset {self.received + bad}")
            self.received += len(data)

    def drain(self, s: socket.socket) -> None:
        """Receive everything sent so far."""
        self.expect(s, self.sent - self.received)


@dataclass
class Staged:
    conn: Conn
    a2b: Stream = field(default_factory=lambda: Stream(A2B))
    b2a: Stream = field(default_factory=lambda: Stream(B2A))


RECV_BYTES = 3000


def stage(keep: Callable[[socket.socket], socket.socket], kind: str, a_is_server: bool) -> Staged:
    """A connection whose side `a` has data in every queue.

    a's receive queue holds RECV_BYTES it has not read; its send queue starts with bytes that
    were sent and lost (b drops everything) and ends with bytes never sent (b's small receive
    window is closed). b is left dropping everything.
    """
    st = Staged(connect_pair(keep, kind, a_is_server, peer_rcvbuf=4096))
    a, b = st.conn.a, st.conn.b
    a.setblocking(False)
    b.setblocking(False)
    st.b2a.send(b, RECV_BYTES)
    assert wait_until(lambda: inq(a) == RECV_BYTES)
    # a writes until its buffer is full; b does not read, so its window closes and, once
    # everything a sent is acknowledged, the rest of a's send queue is never-sent.
    assert st.a2b.send(a, 1 << 20, until_full=True) > 0
    assert wait_until(lambda: 0 < outq(a) == unsent(a)), (outq(a), unsent(a))
    # b starts dropping, then reads what it holds: its window opens, a sends into the void.
    drop_all(b)
    st.a2b.expect(b, inq(b))
    assert wait_until(lambda: outq(a) > unsent(a) > 0), (outq(a), unsent(a))
    return st


def check_snapshot(st: Staged, snap: TcpSnapshot) -> None:
    a = st.conn.a
    family = KINDS[st.conn.kind][0]
    assert snap.family == family
    assert bool(snap.flags & F_V4MAPPED) == (st.conn.kind == "v4mapped")
    assert snap.local == a.getsockname()[:2]
    assert snap.remote == a.getpeername()[:2]
    assert snap.tcp_state == 1
    assert snap.inq_len == RECV_BYTES
    assert snap.outq_len > snap.unsent_len > 0  # sent-but-unacked and never-sent bytes
    acked = st.a2b.sent - snap.outq_len
    assert acked == st.a2b.received  # b got exactly what a's send queue no longer holds
    assert bytes(snap.recv_queue) == expected(B2A, 0, RECV_BYTES)
    assert bytes(snap.send_queue) == expected(A2B, acked, snap.outq_len)
    assert snap.flags & F_NONBLOCK


def continue_both_ways(st: Staged, new: socket.socket) -> None:
    """After a move: b gets a's whole stream once and in order (lost bytes retransmitted),
    the new socket reads its old receive queue first, then both directions go on."""
    b = st.conn.b
    st.a2b.drain(b)
    a_reader = Stream(B2A)  # the new socket's view of b's stream, from its very first byte
    a_reader.expect(new, RECV_BYTES)
    st.b2a.send(b, 200_000)
    a_reader.expect(new, 200_000)
    assert a_reader.received == st.b2a.sent
    st.a2b.send(new, 200_000)
    st.a2b.drain(b)
    assert wait_until(lambda: outq(new) == 0)


# -- moving a connection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "a_is_server"),
    [("ipv4", False), ("ipv6", False), ("v4mapped", False), ("v4mapped", True)],
    ids=["ipv4-client", "ipv6-client", "v4mapped-client", "v4mapped-dualstack-server"],
)
def test_established_ipv4_ipv6_v4mapped_roundtrip(
    closer: Callable[[socket.socket], socket.socket], kind: str, a_is_server: bool
) -> None:
    """freeze -> dump -> release -> restore -> activate with data in every queue."""
    st = stage(closer, kind, a_is_server)
    a, b = st.conn.a, st.conn.b
    before = tcp_counters()
    drop_all(a)  # isolation: nothing reaches a while it is frozen
    freeze(a)
    assert is_frozen(a)
    snap = dump(a)
    check_snapshot(st, snap)
    # The queue bytes live in the C buffer the snapshot owns: still intact after churn.
    gc.collect()
    churn = [bytes(4096) for _ in range(2000)]
    del churn
    check_snapshot(st, snap)

    old_fd = a.fileno()
    release(a)
    assert a.fileno() == -1
    with pytest.raises(OSError) as closed:
        os.fstat(old_fd)
    assert closed.value.errno == errno.EBADF
    undrop(b)
    assert silent(b, 0.1)  # no FIN, no RST from the release

    new = closer(restore(snap))
    assert is_frozen(new)
    assert new.getsockname()[:2] == snap.local
    assert new.getpeername()[:2] == snap.remote
    assert tcp_state(new) == TCP_STATES["ESTABLISHED"]
    assert inq(new) == RECV_BYTES
    assert new.gettimeout() == 0.0  # O_NONBLOCK came along
    assert silent(b, 0.05)  # repair mode: nothing sent yet
    activate(new)
    assert not is_frozen(new)
    continue_both_ways(st, new)
    assert_no_resets(before, silent_closes=1)


@pytest.mark.parametrize("kind", ["ipv4", "ipv6", "v4mapped"])
def test_restore_into_sockets_made_beforehand(
    closer: Callable[[socket.socket], socket.socket], kind: str
) -> None:
    """restore_into_many fills sockets created (and possibly handed out) before the state
    existed: the same socket object, the same open file — a duplicate made beforehand sees
    the restored connection — and activate() works on it as on restore()'s."""
    st = stage(closer, kind, False)
    a, b = st.conn.a, st.conn.b
    before = tcp_counters()
    drop_all(a)
    freeze(a)
    snap = dump(a)
    release(a)
    undrop(b)
    made = closer(socket.socket(snap.family, socket.SOCK_STREAM))
    handed_out = closer(socket.socket(fileno=os.dup(made.fileno())))  # e.g. to the importer
    restore_into_many([made], [snap])
    assert is_frozen(made) and is_frozen(handed_out)
    assert handed_out.getpeername()[:2] == snap.remote
    assert inq(made) == RECV_BYTES
    assert silent(b, 0.05)
    activate(made)
    continue_both_ways(st, handed_out)
    assert_no_resets(before, silent_closes=1)


def test_restore_into_refuses_the_wrong_family_and_used_sockets(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    st = stage(closer, "ipv6", False)
    a = st.conn.a
    drop_all(a)
    freeze(a)
    snap = dump(a)
    wrong = closer(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    used = closer(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    used.bind(("::1", 0))
    udp = closer(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    with pytest.raises(BatchError) as ei:
        restore_into_many([wrong, used, udp], [snap, snap, snap])
    steps = [r.step for r in ei.value.results]
    assert "family" in steps[0].lower() or "AF_INET" in steps[0], steps
    assert all(isinstance(r, OSError) for r in ei.value.results)
    with pytest.raises(ValueError, match="2 sockets for 1 snapshots"):
        restore_into_many([wrong, used], [snap])
    resume(a)  # the original is untouched by all this


def test_no_buffer_stays_exported_after_a_failed_batch(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    """The queue bytes are lent to C only for the call: a BatchError whose traceback keeps
    the call's frame alive must not keep them exported (in a reference cycle with the
    memoryview, CPython's collector could clear the view first and a later release would
    touch freed memory — a segfault seen during garbage collection)."""
    st = stage(closer, "ipv6", False)
    a = st.conn.a
    drop_all(a)
    freeze(a)
    snap = dump(a)
    queues = memoryview(bytearray(snap.queues))
    copy = dataclasses.replace(snap, queues=queues)
    wrong = closer(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with pytest.raises(BatchError) as into:
        restore_into_many([wrong], [copy])
    with pytest.raises(BatchError) as many:  # the original connection still exists here
        restore_many([copy])
    assert into.value.__traceback__ is not None and many.value.__traceback__ is not None
    queues.release()  # BufferError if a from_buffer were still holding it
    resume(a)


@pytest.mark.parametrize("queue", ["receive", "send"])
def test_a_full_queue_does_not_grow_the_buffer_move_after_move(
    closer: Callable[[socket.socket], socket.socket], queue: str
) -> None:
    """A reader that lags keeps its receive queue full, and a writer whose peer lags keeps its
    send queue full. Restoring needs room beyond the queue for the replay, but the restored
    socket must end with the buffer it had: else each move grows it by half again, until the
    queue outgrows what a snapshot may carry."""
    conn = connect_pair(closer, "ipv4")
    a, b = conn.a, conn.b
    b.setblocking(False)
    option = socket.SO_RCVBUF if queue == "receive" else socket.SO_SNDBUF
    stream = Stream(B2A if queue == "receive" else A2B)

    def fill() -> None:  # nobody reads: the queue under test fills up
        stream.send(b if queue == "receive" else a, 64 << 20, until_full=True)

    fill()
    assert wait_until(lambda: (inq(a) if queue == "receive" else outq(a)) > 0)
    time.sleep(0.2)
    sizes = []
    for _ in range(4):
        before = a.getsockopt(socket.SOL_SOCKET, option)
        drop_all(a)
        freeze(a)
        snap = dump(a)
        release(a)
        a = closer(restore(snap))
        activate(a)
        queued = snap.inq_len if queue == "receive" else snap.outq_len
        sizes.append((before, a.getsockopt(socket.SOL_SOCKET, option), queued))
        assert queued > 0
        fill()
        time.sleep(0.1)
    assert all(after <= before for before, after, _ in sizes), sizes
    assert sizes[-1][1] <= sizes[0][0], sizes
    stream.drain(a if queue == "receive" else b)  # every byte, once and in order


def test_restore_from_bytes_behaves_like_original(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    """to_bytes -> from_bytes -> restore rebuilds the same connection state."""
    st = stage(closer, "ipv6", a_is_server=False)
    a, b = st.conn.a, st.conn.b
    before = tcp_counters()
    drop_all(a)
    freeze(a)
    original = dump(a)
    data = original.to_bytes()
    release(a)
    undrop(b)

    decoded = TcpSnapshot.from_bytes(data)
    assert decoded == original
    new = closer(restore(decoded))
    # Still frozen, the restored socket dumps like the original, except that its never-sent
    # tail is not queued yet (activate sends it).
    twin = dump(new)
    sent = original.outq_len - original.unsent_len
    assert twin.unsent_len == 0
    assert twin.outq_len == sent
    assert twin.snd_seq == (original.snd_seq - original.unsent_len) % 2**32
    assert bytes(twin.send_queue) == bytes(original.send_queue[:sent])
    assert bytes(twin.recv_queue) == bytes(original.recv_queue)
    same = (
        "family", "local_addr", "local_port", "remote_addr", "remote_port", "flags",
        "tcp_state", "rcv_seq", "inq_len", "mss_clamp", "snd_wscale", "rcv_wscale",
        "snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup", "keepidle", "keepintvl",
        "keepcnt", "user_timeout", "buf_lock", "mark", "tos", "ttl", "congestion",
    )  # fmt: skip
    assert {k: getattr(twin, k) for k in same} == {k: getattr(original, k) for k in same}
    # The timestamp clock carries on from the original's (no PAWS drops at the peer).
    assert 0 <= (twin.ts_val - original.ts_val) % 2**32 < 10_000

    activate(new)
    continue_both_ways(st, new)
    assert_no_resets(before, silent_closes=1)


def test_snapshot_changed_with_replace_restores_the_changed_values(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    """TcpSnapshot is frozen; dataclasses.replace() is how a changed copy is made. The copy
    restores with its own values, and inconsistent ones are refused, not trusted."""
    c = connect_pair(closer, "ipv4")
    Stream(B2A).send(c.b, 3000)
    assert wait_until(lambda: inq(c.a) == 3000)
    freeze(c.a)
    snap = dump(c.a)
    release(c.a)
    with pytest.raises(SnapshotError):
        restore(replace(snap, queues=snap.queues[:100]))  # lengths say 3000
    with pytest.raises(SnapshotError):
        restore(replace(snap, local_port=0))
    new = closer(restore(replace(snap, mark=0x77, keepidle=99)))
    activate(new)
    assert new.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x77
    assert new.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 99
    Stream(B2A).expect(new, 3000)


def test_resume_after_freeze_loses_nothing(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    """The failed-move path: freeze + dump, then resume on the same socket."""
    st = stage(closer, "ipv4", a_is_server=False)
    a, b = st.conn.a, st.conn.b
    before = tcp_counters()
    drop_all(a)
    freeze(a)
    check_snapshot(st, dump(a))
    resume(a)
    assert not is_frozen(a)
    undrop(a)
    undrop(b)
    st.a2b.drain(b)
    reader = Stream(B2A)
    reader.expect(a, RECV_BYTES)
    st.b2a.send(b, 100_000)
    reader.expect(a, 100_000)
    st.a2b.send(a, 100_000)
    st.a2b.drain(b)
    assert_no_resets(before, silent_closes=0)


def test_release_sends_no_fin_or_rst(closer: Callable[[socket.socket], socket.socket]) -> None:
    """After release the peer sees neither EOF nor reset; the restored socket carries on."""
    c = connect_pair(closer, "ipv6")
    a2b, b2a = Stream(A2B), Stream(B2A)
    a2b.send(c.a, 10_000)
    a2b.drain(c.b)
    b2a.send(c.b, 500)  # left unread in a's receive queue
    assert wait_until(lambda: inq(c.a) == 500)
    before = tcp_counters()
    freeze(c.a)
    snap = dump(c.a)
    release(c.a)
    assert silent(c.b, 0.3)
    assert tcp_state(c.b) == TCP_STATES["ESTABLISHED"]
    with pytest.raises(BlockingIOError):  # EOF would return b"" instead
        c.b.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    assert tcp_counters()["OutRsts"] == before["OutRsts"]
    new = closer(restore(snap))
    activate(new)
    reader = Stream(B2A)
    reader.expect(new, 500)
    b2a.send(c.b, 20_000)
    reader.expect(new, 20_000)
    a2b.send(new, 20_000)
    a2b.drain(c.b)
    assert_no_resets(before, silent_closes=1)


OPTION_CASES = [
    # (kind, customize, buffers): buffers "pinned" (both, above the 64 KiB restore floor),
    # "sndbuf-only", "small" (both pinned below the floor) or "auto" (autotuned)
    pytest.param("ipv4", True, "pinned", id="ipv4-custom-pinned"),
    pytest.param("ipv6", True, "auto", id="ipv6-custom-autotuned"),
    pytest.param("v4mapped", True, "sndbuf-only", id="v4mapped-custom-sndbuf-pinned"),
    pytest.param("ipv6", True, "small", id="ipv6-pinned-small"),
    pytest.param("ipv4", False, "auto", id="ipv4-defaults"),
]


def read_options(s: socket.socket, kind: str) -> dict[str, object]:
    tcp, sol = socket.IPPROTO_TCP, socket.SOL_SOCKET
    if kind == "ipv6":
        tos = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
        ttl = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
    else:
        tos = s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)
        ttl = s.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    return {
        "nodelay": s.getsockopt(tcp, socket.TCP_NODELAY),
        "cork": s.getsockopt(tcp, socket.TCP_CORK),
        "keepalive": s.getsockopt(sol, socket.SO_KEEPALIVE),
        "keepidle": s.getsockopt(tcp, socket.TCP_KEEPIDLE),
        "keepintvl": s.getsockopt(tcp, socket.TCP_KEEPINTVL),
        "keepcnt": s.getsockopt(tcp, socket.TCP_KEEPCNT),
        "user_timeout": s.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
        "mark": s.getsockopt(sol, socket.SO_MARK),
        "congestion": s.getsockopt(tcp, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode(),
        "tos": tos,
        "ttl": ttl,
        "sndbuf": s.getsockopt(sol, socket.SO_SNDBUF),
        "rcvbuf": s.getsockopt(sol, socket.SO_RCVBUF),
        "buf_lock": s.getsockopt(sol, SO_BUF_LOCK),
        "nonblock": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK),
    }


def _available_cc() -> set[str]:
    with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
        return set(f.read().split())


@pytest.mark.parametrize(("kind", "customize", "buffers"), OPTION_CASES)
def test_options_survive(
    closer: Callable[[socket.socket], socket.socket], kind: str, customize: bool, buffers: str
) -> None:
    """The socket options a user would notice losing read the same after a move."""
    c = connect_pair(closer, kind)
    a = c.a
    tcp, sol = socket.IPPROTO_TCP, socket.SOL_SOCKET
    if customize:
        a.setsockopt(tcp, socket.TCP_NODELAY, 1)
        a.setsockopt(tcp, socket.TCP_CORK, 1)
        a.setsockopt(sol, socket.SO_KEEPALIVE, 1)
        a.setsockopt(tcp, socket.TCP_KEEPIDLE, 77)
        a.setsockopt(tcp, socket.TCP_KEEPINTVL, 11)
        a.setsockopt(tcp, socket.TCP_KEEPCNT, 4)
        a.setsockopt(tcp, socket.TCP_USER_TIMEOUT, 12_345)
        a.setsockopt(sol, socket.SO_MARK, 0x2A)
        if kind == "ipv6":
            a.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0x28)
            a.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 33)
        else:
            a.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x28)
            a.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 33)
        for cc in ("reno", "bbr", "cubic"):  # one that is not this namespace's default
            if cc in _available_cc() and cc != read_options(a, kind)["congestion"]:
                a.setsockopt(tcp, socket.TCP_CONGESTION, cc.encode())
                break
        a.setblocking(False)
    if buffers in ("pinned", "sndbuf-only"):
        a.setsockopt(sol, socket.SO_SNDBUF, 100_000)
    if buffers == "pinned":
        a.setsockopt(sol, socket.SO_RCVBUF, 120_000)
    if buffers == "small":
        a.setsockopt(sol, socket.SO_SNDBUF, 8192)
        a.setsockopt(sol, socket.SO_RCVBUF, 8192)
    old = read_options(a, kind)
    if customize:  # the options really are set, so the comparison below means something
        assert old["nodelay"] and old["cork"] and old["keepalive"] and old["nonblock"]
        assert (old["keepidle"], old["keepintvl"], old["keepcnt"]) == (77, 11, 4)
        assert (old["user_timeout"], old["mark"], old["tos"], old["ttl"]) == (12345, 42, 40, 33)
    want_lock = {"pinned": 3, "small": 3, "sndbuf-only": 1, "auto": 0}[buffers]
    assert old["buf_lock"] == want_lock

    freeze(a)
    snap = dump(a)
    release(a)
    new = closer(restore(snap))
    activate(new)
    now = read_options(new, kind)
    if buffers == "auto":  # the kernel's to tune: at least as large, and still autotuned
        assert now["sndbuf"] >= old["sndbuf"] and now["rcvbuf"] >= old["rcvbuf"]  # type: ignore[operator]
        now["sndbuf"], now["rcvbuf"] = old["sndbuf"], old["rcvbuf"]
    elif buffers == "sndbuf-only":
        assert now["rcvbuf"] >= old["rcvbuf"]  # type: ignore[operator]
        now["rcvbuf"] = old["rcvbuf"]
    assert now == old
    assert new.gettimeout() == (0.0 if customize else None)
    # And the moved connection works with them. (Uncorked first: a corked partial segment
    # is flushed by a timer based on the RTO, which is 3 s on a restored socket — see
    # test_restored_socket_has_an_rtt_estimate.)
    new.setsockopt(tcp, socket.TCP_CORK, 0)
    new.setblocking(True)
    new.sendall(b"after the move")
    c.b.settimeout(TIMEOUT)
    assert c.b.recv(100) == b"after the move"


@pytest.mark.xfail(
    strict=True,
    reason="a socket built by repair-mode connect() has no RTT sample: unless this namespace's "
    "tcp_metrics cache holds one for the peer, tcp_init_metrics sets its RTO to "
    "TCP_TIMEOUT_FALLBACK (3 s) and a tail-loss probe waits 1 s. Bytes lost in flight around "
    "the freeze then take >= 3 s to recover, and corked data waits 3 s instead of 200 ms.",
)
def test_restored_socket_has_an_rtt_estimate(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    c = connect_pair(closer, "ipv6")
    Stream(A2B).send(c.a, 1000)  # RTT samples for the original
    c.b.recv(1000)
    original_rto = struct.unpack_from(
        "I", c.a.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 8
    )[0]
    assert original_rto < 1_000_000
    freeze(c.a)
    snap = dump(c.a)
    release(c.a)  # the namespace's first connection to close: no cached metrics yet
    new = closer(restore(snap))
    activate(new)
    rto_us = struct.unpack_from("I", new.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 8)[0]
    assert rto_us <= 1_000_000, f"restored RTO {rto_us} us, original {original_rto} us"


# -- refusals: left untouched and working -------------------------------------------------------
# (The half-closed states FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK and CLOSING are moved, not refused:
# tests/netns/test_half_closed.py.)


@dataclass
class Refusal:
    target: object  # what freeze() is given: a socket or an fd
    code: int
    err: int
    describes: str  # must appear in the message (names the socket)
    still_works: Callable[[], None]


def _assert_established_pair_works(x: socket.socket, y: socket.socket) -> None:
    for s, r in ((x, y), (y, x)):
        st = Stream(A2B)
        st.send(s, 10_000)
        st.drain(r)


def _refuse_listen(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    c = connect_pair(keep, "ipv6")

    def works() -> None:
        x = keep(socket.create_connection(("::1", c.listener.getsockname()[1])))
        _assert_established_pair_works(x, keep(c.listener.accept()[0]))

    return Refusal(c.listener, -5, errno.EINVAL, "LISTEN", works)


def _refuse_unconnected(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    s = keep(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    lsock = keep(socket.create_server(("127.0.0.1", 0)))

    def works() -> None:
        s.connect(lsock.getsockname())
        _assert_established_pair_works(s, keep(lsock.accept()[0]))

    return Refusal(s, -5, errno.EINVAL, "CLOSE", works)


def _refuse_syn_sent(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    lsock = keep(socket.create_server(("127.0.0.1", 0)))
    drop_all(lsock)  # the SYN is lost
    s = keep(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.setblocking(False)
    assert s.connect_ex(lsock.getsockname()) == errno.EINPROGRESS
    assert tcp_state(s) == TCP_STATES["SYN_SENT"]

    def works() -> None:  # the SYN retransmission (after 1 s) completes the handshake
        assert tcp_state(s) == TCP_STATES["SYN_SENT"]
        undrop(lsock)
        assert select.select([], [s], [], TIMEOUT)[1]
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        _assert_established_pair_works(s, keep(lsock.accept()[0]))

    return Refusal(s, -5, errno.EINVAL, "SYN_SENT", works)


def _half_closed(keep: Callable[[socket.socket], socket.socket]) -> Conn:
    c = connect_pair(keep, "ipv4")
    c.a.shutdown(socket.SHUT_WR)
    assert wait_until(lambda: tcp_state(c.a) == TCP_STATES["FIN_WAIT2"])
    assert tcp_state(c.b) == TCP_STATES["CLOSE_WAIT"]
    return c


def _refuse_udp(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    u = keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    u.bind(("127.0.0.1", 0))
    u.connect(u.getsockname())

    def works() -> None:
        u.send(b"datagram")
        assert u.recv(100) == b"datagram"

    return Refusal(u, -2, errno.EPROTONOSUPPORT, "SOCK_DGRAM", works)


def _refuse_unix(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    x, y = socket.socketpair()
    keep(x), keep(y)
    return Refusal(x, -2, errno.EPROTONOSUPPORT, "SOCK_STREAM proto 0", lambda: None)


def _refuse_mptcp(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    try:
        lsock = keep(socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP))
    except OSError as e:
        pytest.skip(
            f"this kernel cannot create MPTCP sockets ({e}); the refusal is keyed on "
            "SO_PROTOCOL == 262 and cannot be exercised here"
        )
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    s = keep(socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP))
    s.connect(lsock.getsockname())
    peer = keep(lsock.accept()[0])
    assert tcp_state(s) == TCP_STATES["ESTABLISHED"]
    return Refusal(
        s, -4, errno.ENOPROTOOPT, "proto 262", lambda: _assert_established_pair_works(s, peer)
    )


def _refuse_pipe(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    r, w = os.pipe()

    def works() -> None:
        try:
            os.write(w, b"p")
            assert os.read(r, 1) == b"p"
        finally:
            os.close(r)
            os.close(w)

    return Refusal(r, -1, errno.ENOTSOCK, f"fd {r}", works)


def _refuse_closed_fd(keep: Callable[[socket.socket], socket.socket]) -> Refusal:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return Refusal(fd, -1, errno.EBADF, f"fd {fd}", lambda: None)


REFUSALS = {
    "listen": _refuse_listen,
    "unconnected-close": _refuse_unconnected,
    "syn_sent": _refuse_syn_sent,
    "udp": _refuse_udp,
    "unix": _refuse_unix,
    "mptcp": _refuse_mptcp,
    "pipe": _refuse_pipe,
    "closed-fd": _refuse_closed_fd,
}


@pytest.mark.parametrize("make", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_socket_is_left_untouched_and_working(
    closer: Callable[[socket.socket], socket.socket],
    make: Callable[[Callable[[socket.socket], socket.socket]], Refusal],
) -> None:
    case = make(closer)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(NotRepairable) as info:
        freeze(case.target)  # type: ignore[arg-type]
    assert len(os.listdir("/proc/self/fd")) == fds, "the refusal leaked an fd"
    e = info.value
    assert e.code == case.code
    assert e.errno == case.err
    assert e.strerror is not None and e.strerror.startswith("freeze ")
    assert e.step in str(e) and e.step
    assert case.describes in str(e)
    if isinstance(case.target, socket.socket):
        assert case.target.fileno() >= 0
        if case.target.type == socket.SOCK_STREAM and case.target.proto == socket.IPPROTO_TCP:
            assert not is_frozen(case.target)
    case.still_works()


def test_time_wait_is_not_held_by_an_fd(closer: Callable[[socket.socket], socket.socket]) -> None:
    """TIME_WAIT cannot be frozen through an fd: the socket holding the fd reads CLOSE (the
    TIME_WAIT state lives in a separate kernel object) and is refused as such."""
    c = _half_closed(closer)
    c.b.shutdown(socket.SHUT_WR)
    assert wait_until(lambda: tcp_state(c.a) == TCP_STATES["CLOSE"])
    with pytest.raises(NotRepairable) as info:
        freeze(c.a)
    assert info.value.code == -5 and "CLOSE" in str(info.value)


def test_dump_of_unfrozen_socket_fails_and_socket_keeps_working(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    c = connect_pair(closer, "ipv4")
    Stream(B2A).send(c.b, 1000)
    assert wait_until(lambda: inq(c.a) == 1000)
    with pytest.raises(TcpRepairError) as info:
        dump(c.a)
    e = info.value
    assert not isinstance(e, NotRepairable)
    assert "TCP_REPAIR_QUEUE" in e.step and "not frozen" in e.step
    assert e.errno == errno.EPERM
    assert not is_frozen(c.a)
    reader = Stream(B2A)
    reader.expect(c.a, 1000)
    _assert_established_pair_works(c.a, c.b)


# -- addresses and namespaces -------------------------------------------------------------------


def test_restore_binds_a_port_held_by_a_listener(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    """An accepted connection shares its local port with the listener. Restored in the same
    namespace while the listener holds that port, it binds anyway: repair mode sets
    SK_FORCE_REUSE."""
    c = connect_pair(closer, "ipv6", a_is_server=True)
    port = c.listener.getsockname()[1]
    assert c.a.getsockname()[1] == port
    freeze(c.a)
    snap = dump(c.a)
    release(c.a)
    new = closer(restore(snap))
    activate(new)
    assert new.getsockname()[1] == port
    _assert_established_pair_works(new, c.b)
    # The listener is unaffected.
    x = closer(socket.create_connection(("::1", port)))
    _assert_established_pair_works(x, closer(c.listener.accept()[0]))


def test_restore_fails_while_the_original_connection_exists_in_the_namespace(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    """A connection's four-tuple is unique in a namespace: while the original socket is still
    there (frozen, not released), restoring it in the same namespace fails at connect() with
    EADDRNOTAVAIL, and the original is unharmed (the move resumes it)."""
    c = connect_pair(closer, "ipv4")
    freeze(c.a)
    snap = dump(c.a)
    with pytest.raises(TcpRepairError) as info:
        restore(snap)
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert "connect" in info.value.step
    resume(c.a)
    _assert_established_pair_works(c.a, c.b)


def test_restore_creates_the_socket_in_the_calling_threads_namespace(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    c = connect_pair(closer, "ipv4")
    freeze(c.a)
    snap = dump(c.a)
    here = _ns_inode()
    seen: dict[str, object] = {}

    def elsewhere() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            _lo_up()
            seen["thread_ns"] = _ns_inode()
            s = restore(snap)
            nsfd = fcntl.ioctl(s.fileno(), SIOCGSKNS)
            seen["socket_ns"] = os.fstat(nsfd).st_ino
            os.close(nsfd)
            release(s)  # silent: it never left repair mode
        except BaseException as e:
            seen["error"] = e

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert "error" not in seen, seen.get("error")
    assert seen["socket_ns"] == seen["thread_ns"] != here
    resume(c.a)
    _assert_established_pair_works(c.a, c.b)


# -- release refusals ---------------------------------------------------------------------------


def test_release_refused_leaves_socket_usable(
    closer: Callable[[socket.socket], socket.socket],
) -> None:
    """release() of something that cannot enter repair mode raises TcpRepairError and leaves
    the caller's socket object or fd open and working."""
    c = connect_pair(closer, "ipv4")
    lfd = c.listener.fileno()
    with pytest.raises(TcpRepairError) as info:
        release(c.listener)
    assert info.value.errno == errno.EPERM
    assert c.listener.fileno() == lfd
    x = closer(socket.create_connection(c.listener.getsockname()))
    _assert_established_pair_works(x, closer(c.listener.accept()[0]))

    u = closer(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with pytest.raises(TcpRepairError):
        release(u)
    assert u.fileno() >= 0
    u.bind(("127.0.0.1", 0))

    r, w = os.pipe()
    try:
        with pytest.raises(TcpRepairError) as info:
            release(r)
        assert info.value.errno == errno.ENOTSOCK
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)
