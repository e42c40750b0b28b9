"""Move live TCP connections: freeze, dump, restore, activate, resume, release.

The public face of the native helper (csrc/tcp_repair.c); other tools import this module, never
the cffi `lib`. Every function takes a socket object or a raw fd.

Exporting device::

    freeze(sock)              # after the flow is isolated (drop rule or address removed)
    snap = dump(sock)         # -> TcpSnapshot; snap.to_bytes() to send it elsewhere
    ...                       # on success: release(sock); on failure: resume(sock)

Importing device (in the network namespace the socket must live in)::

    new = restore(snap)       # new socket, still in repair mode
    activate(new)             # repair off, never-sent bytes go out, traffic flows

Errors are TcpRepairError (an OSError with `errno`, `step` and `code`); sockets that cannot be
repaired at all raise its subclass NotRepairable and are left untouched.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from sessmob._native._tcp_repair import ffi, lib
from sessmob.tcp_snapshot import (
    F_NONBLOCK,
    F_V4MAPPED,
    SnapshotError,
    TcpSnapshot,
    UnsupportedVersion,
)

__all__ = [
    "AckSender",
    "NotRepairable",
    "SnapshotError",
    "TcpRepairError",
    "TcpSnapshot",
    "UnsupportedVersion",
    "activate",
    "dump",
    "freeze",
    "release",
    "restore",
    "resume",
]

FdLike = socket.socket | int

# Codes of enum tcpr_error meaning "this socket is not something TCP repair can move".
_REFUSALS = frozenset({-1, -2, -3, -4, -5})
_E_REPAIR_ON = -6

# Integer fields with the same name in struct tcpr_state and TcpSnapshot.
_INT_FIELDS = (
    "flags", "tcp_state", "snd_seq", "rcv_seq", "inq_len", "outq_len", "unsent_len",
    "mss_clamp", "snd_wscale", "rcv_wscale", "ts_val", "snd_wl1", "snd_wnd", "max_window",
    "rcv_wnd", "rcv_wup", "keepidle", "keepintvl", "keepcnt", "user_timeout", "sndbuf",
    "rcvbuf", "buf_lock", "mark", "tos", "ttl",
)  # fmt: skip

_E_ACK = -30
_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Restored:
    """What activate() needs of a socket restore() built: its state and never-sent bytes."""

    inode: int
    state: Any  # struct tcpr_state * (cffi)
    unsent: memoryview
    v4: bool  # the flow speaks IPv4 (AF_INET, or AF_INET6 with mapped addresses)


# Restored sockets awaiting activate(), by fd (the inode guards against fd reuse).
_restored: dict[int, _Restored] = {}
_restored_lock = threading.Lock()


class TcpRepairError(OSError):
    """A step of TCP repair failed; `step` names it, `errno` is the kernel's reason."""

    def __init__(self, op: str, code: int, err: int, where: str) -> None:
        self.op = op
        self.code = code
        self.step = ffi.string(lib.tcpr_strerror(code)).decode()
        reason = os.strerror(err) if err else "no errno"
        super().__init__(err, f"{op} {where}: {self.step}: {reason}")


class NotRepairable(TcpRepairError):
    """The socket cannot be moved (not TCP, MPTCP, LISTEN, TIME_WAIT, ...); left untouched."""


def _fileno(sock: FdLike) -> int:
    fd = sock.fileno() if isinstance(sock, socket.socket) else sock
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"not an open socket or fd: {sock!r}")
    return fd


_TCP_STATES = (
    "?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
    "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV",
)  # fmt: skip


def _describe(fd: int) -> str:
    """Name the socket in an error message (only on the error path: costs syscalls)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return f"fd {fd}"
    try:
        s = socket.socket(fileno=dup)
    except OSError:  # not a socket: the dup must not leak
        os.close(dup)
        return f"fd {fd}"
    parts = [f"fd {fd}"]
    with s:
        try:
            parts.append(f"type {s.type.name} proto {s.proto}")
            if s.type == socket.SOCK_STREAM and s.proto == socket.IPPROTO_TCP:
                state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                parts.append(_TCP_STATES[state] if state < len(_TCP_STATES) else str(state))
            parts.append(_fmt(s.getsockname()))
            parts.append("-> " + _fmt(s.getpeername()))
        except OSError:
            pass
    return " ".join(parts)


def _fmt(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def _check(op: str, rc: int, fd: int) -> None:
    if rc:
        err = ffi.errno
        cls = NotRepairable if rc in _REFUSALS else TcpRepairError
        raise cls(op, rc, err, _describe(fd))


def freeze(sock: FdLike) -> None:
    """Check the socket can be repaired, then switch TCP repair mode on.

    Isolate the flow first: in repair mode the kernel still ACKs arriving data.
    """
    fd = _fileno(sock)
    _check("freeze", lib.tcpr_freeze(fd), fd)


def dump(sock: FdLike) -> TcpSnapshot:
    """Read the complete state of a frozen socket. The socket itself is not changed."""
    fd = _fileno(sock)
    st = ffi.new("struct tcpr_state *")
    st.size = ffi.sizeof("struct tcpr_state")
    qp = ffi.new("uint8_t **")
    _check("dump", lib.tcpr_dump(fd, st, qp), fd)
    n = st.inq_len + st.outq_len
    # The snapshot keeps the C buffer (freed with it) instead of copying the queues.
    queues = memoryview(ffi.buffer(ffi.gc(qp[0], lib.free), n)) if n else memoryview(b"")
    family = st.family
    alen = 4 if family == socket.AF_INET else 16
    values = {name: getattr(st, name) for name in _INT_FIELDS}
    return TcpSnapshot(
        family=family,
        local_addr=socket.inet_ntop(family, ffi.buffer(st.src_addr, alen)[:]),
        local_port=st.src_port,
        remote_addr=socket.inet_ntop(family, ffi.buffer(st.dst_addr, alen)[:]),
        remote_port=st.dst_port,
        congestion=ffi.string(st.congestion).decode("ascii", "replace"),
        queues=queues,
        **values,
    )


def restore(snapshot: TcpSnapshot) -> socket.socket:
    """Rebuild the connection as a new socket in the calling thread's network namespace.

    The socket stays in repair mode (silent) until activate(); the local address need not be
    configured yet (IP_FREEBIND). The snapshot is validated first.
    """
    snapshot.validate()
    st = ffi.new("struct tcpr_state *")
    st.version = lib.TCPR_STATE_VERSION
    st.size = ffi.sizeof("struct tcpr_state")
    st.family = snapshot.family
    for name in _INT_FIELDS:
        setattr(st, name, getattr(snapshot, name))
    st.src_addr = list(socket.inet_pton(snapshot.family, snapshot.local_addr).ljust(16, b"\0"))
    st.dst_addr = list(socket.inet_pton(snapshot.family, snapshot.remote_addr).ljust(16, b"\0"))
    st.src_port = snapshot.local_port
    st.dst_port = snapshot.remote_port
    st.congestion = snapshot.congestion.encode("ascii")
    queues = ffi.from_buffer(snapshot.queues) if len(snapshot.queues) else ffi.NULL
    fdp = ffi.new("int *")
    rc = lib.tcpr_restore(st, queues, fdp)
    if rc:
        raise TcpRepairError(
            "restore",
            rc,
            ffi.errno,
            f"[{snapshot.local_addr}]:{snapshot.local_port} -> "
            f"[{snapshot.remote_addr}]:{snapshot.remote_port}",
        )
    fd = fdp[0]
    sock = socket.socket(snapshot.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    if snapshot.flags & F_NONBLOCK:
        sock.setblocking(False)
    v4 = snapshot.family == socket.AF_INET or bool(snapshot.flags & F_V4MAPPED)
    with _restored_lock:
        _restored[fd] = _Restored(os.fstat(fd).st_ino, st, snapshot.unsent, v4)
    return sock


def _take_restored(fd: int) -> _Restored | None:
    with _restored_lock:
        entry = _restored.pop(fd, None)
    if entry is None:
        return None
    try:
        same = os.fstat(fd).st_ino == entry.inode
    except OSError:
        same = False
    return entry if same else None


class AckSender:
    """Raw sockets with which activate() tells the peer the restored window at once.

    Leaving repair mode makes the kernel send only a window probe with an old sequence
    number; the peer answers with a duplicate ACK and keeps its old idea of our receive
    window. If that idea is stale (an ACK lost while frozen, a zero window), the peer waits
    for its zero-window probe timer: hundreds of milliseconds. activate() therefore sends one
    pure ACK carrying the window the restored socket believes it advertised.

    Open one per network namespace before the freeze (it is created in the calling thread's
    namespace). IPPROTO_RAW sockets send only, so they cost nothing while idle.
    """

    def __init__(self) -> None:
        self.v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            self.v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        except BaseException:
            self.v4.close()
            raise

    def close(self) -> None:
        self.v4.close()
        self.v6.close()

    def __enter__(self) -> AckSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def activate(sock: FdLike, acks: AckSender | None = None) -> None:
    """Switch repair mode off on a restored socket: the connection runs here from now on.

    For a socket built by restore(), also tells the peer the current receive window (see
    AckSender; without `acks` a temporary one is opened, which costs two socket() calls) and
    sends the never-sent bytes. Any other frozen socket just leaves repair mode.
    """
    fd = _fileno(sock)
    entry = _take_restored(fd)
    if entry is None:
        _check("activate", lib.tcpr_activate(fd, ffi.NULL, 0), fd)
        return
    own = acks is None
    senders = AckSender() if acks is None else acks
    try:
        raw = (senders.v4 if entry.v4 else senders.v6).fileno()
        unsent = ffi.from_buffer(entry.unsent) if len(entry.unsent) else ffi.NULL
        rc = lib.tcpr_activate_ack(fd, entry.state, raw, unsent, len(entry.unsent))
    finally:
        if own:
            senders.close()
    if rc == _E_ACK:
        # Active and all bytes sent; only the courtesy ACK failed. The peer will learn the
        # window from the next segment, or its own probe.
        _log.warning("activate fd %d: window ACK not sent: %s", fd, os.strerror(ffi.errno))
        return
    _check("activate", rc, fd)


def resume(sock: FdLike) -> None:
    """Undo freeze() on the exporting device (the move failed): repair mode off."""
    fd = _fileno(sock)
    _check("resume", lib.tcpr_resume(fd), fd)


def release(sock: FdLike) -> None:
    """Close a frozen socket without a FIN or RST; its connection lives on elsewhere.

    Call only once the flow's address is gone from this device (or still isolated):
    afterwards this device would answer the peer's packets with RST.
    If the socket cannot enter repair mode (not TCP, LISTEN, ...), closing it would not be
    silent: TcpRepairError is raised and the socket, object or fd, is left open and untouched.
    """
    fd = _fileno(sock)
    _take_restored(fd)
    rc = lib.tcpr_release(fd)
    err = ffi.errno
    if rc == _E_REPAIR_ON:
        raise TcpRepairError("release", rc, err, _describe(fd))
    if isinstance(sock, socket.socket):
        sock.detach()  # closed by tcpr_release (close() frees the fd even when it fails)
    if rc:
        raise TcpRepairError("release", rc, err, f"fd {fd}")


def is_v4mapped(snapshot: TcpSnapshot) -> bool:
    """Whether the snapshot is of an IPv6 socket carrying IPv4 through mapped addresses."""
    return bool(snapshot.flags & F_V4MAPPED)
