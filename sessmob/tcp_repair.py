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

import contextlib
import dataclasses
import fcntl
import logging
import operator
import os
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sessmob._native._tcp_repair import ffi, lib
from sessmob.closing import Closing
from sessmob.tcp_snapshot import (
    F_NONBLOCK,
    F_V4MAPPED,
    SnapshotError,
    TcpSnapshot,
    UnsupportedVersion,
)

__all__ = [
    "AckSender",
    "BatchError",
    "NotRepairable",
    "SnapshotError",
    "TcpRepairError",
    "TcpSnapshot",
    "UnsupportedVersion",
    "activate",
    "activate_many",
    "dump",
    "dump_many",
    "freeze",
    "freeze_many",
    "release",
    "release_many",
    "restore",
    "restore_into_many",
    "restore_many",
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

    sock: weakref.ref[socket.socket]  # the object restore() returned (guards against fd reuse)
    state: tuple[TcpSnapshot, Any]  # the snapshot (owns the memory) and its struct tcpr_state *
    unsent: memoryview
    v4: bool  # the flow speaks IPv4 (AF_INET, or AF_INET6 with mapped addresses)


# Restored sockets awaiting activate(), by fd. The entry is valid only while the socket
# object restore() returned is alive and still owns that fd: a closed socket's fd number may
# belong to another socket by then.
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


def _layout() -> tuple[struct.Struct, list[str]]:
    """A struct.Struct reading all of struct tcpr_state at once (one call instead of one
    cffi attribute access per field: this is per socket in batches of a thousand)."""
    codes = {"uint32_t": "I", "int32_t": "i", "uint16_t": "H", "uint8_t": "B"}
    fmt, names, pos = ["="], [], 0
    for name, f in ffi.typeof("struct tcpr_state").fields:
        size = ffi.sizeof(f.type)
        if f.offset > pos:
            fmt.append(f"{f.offset - pos}x")
        fmt.append(codes.get(f.type.cname, f"{size}s"))
        names.append(name)
        pos = f.offset + size
    fmt.append(f"{ffi.sizeof('struct tcpr_state') - pos}x")
    return struct.Struct("".join(fmt)), names


_LAYOUT, _LAYOUT_NAMES = _layout()
# _snapshot() fills the slots in declaration order: the integers must sit in this order.
assert [f.name for f in dataclasses.fields(TcpSnapshot)][5:31] == list(_INT_FIELDS)
_new = object.__new__
_SLOTS = [TcpSnapshot.__dict__[f.name].__set__ for f in dataclasses.fields(TcpSnapshot)]
_INT_INDEX = operator.itemgetter(*(_LAYOUT_NAMES.index(n) for n in _INT_FIELDS))
_INQ, _OUTQ = _INT_FIELDS.index("inq_len"), _INT_FIELDS.index("outq_len")
_EMPTY = memoryview(b"")
_I = {n: _LAYOUT_NAMES.index(n) for n in ("family", "src_addr", "dst_addr", "src_port",
                                           "dst_port", "congestion")}  # fmt: skip


def _snapshot(owner: Any, st: Any, qbuf: Any) -> TcpSnapshot:
    """A TcpSnapshot over a dumped state; the queue buffer is adopted (freed with it)."""
    v = _LAYOUT.unpack(ffi.buffer(st))
    ints = _INT_INDEX(v)  # TcpSnapshot declares these in _INT_FIELDS order, flags .. ttl
    n = ints[_INQ] + ints[_OUTQ]
    queues = memoryview(ffi.buffer(ffi.gc(qbuf, lib.free), n)) if n else _EMPTY
    family = v[_I["family"]]
    alen = 4 if family == socket.AF_INET else 16
    # Built through the slots directly: a batch of a thousand pays the frozen dataclass's
    # __init__ (one object.__setattr__ per field, ~5 us) a thousand times otherwise. The
    # values come from the kernel through our own dump, so nothing is skipped that
    # __init__ would check (it checks nothing).
    snap = _new(TcpSnapshot)
    for put, value in zip(
        _SLOTS,
        (
            family,
            socket.inet_ntop(family, v[_I["src_addr"]][:alen]),
            v[_I["src_port"]],
            socket.inet_ntop(family, v[_I["dst_addr"]][:alen]),
            v[_I["dst_port"]],
            *ints,
            v[_I["congestion"]].partition(b"\0")[0].decode("ascii", "replace"),
            queues,
            (owner, st),
        ),
        strict=True,
    ):
        put(snap, value)
    return snap


def _native_state(snapshot: TcpSnapshot) -> Any:
    """The snapshot as a struct tcpr_state: the dumped one, or built (and cached) once."""
    native = snapshot._native
    if native is not None and native[1] is not None:
        return native[1]
    if native is None:  # not decoded by from_bytes (which validated it): check it now
        # Sizes were limited where the bytes were decoded (from_bytes(max_queue=...)); here
        # only consistency matters.
        snapshot.validate(max_queue=2**31 - 1)
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
    object.__setattr__(snapshot, "_native", (st, st))
    return st


@contextlib.contextmanager
def _borrowed(views: Iterable[memoryview]) -> Iterator[list[Any]]:
    """C pointers to the bytes of `views` (NULL for empty ones) for the length of one call
    into C, released on leaving rather than left to the garbage collector.

    Why: a `from_buffer` still held by a frame that an exception keeps alive (the traceback
    of a BatchError) sits in a reference cycle with the memoryview it exports; CPython 3.11's
    cycle collector can clear that memoryview first, and releasing the buffer afterwards then
    touches freed memory — a segfault during a later garbage collection."""
    bufs = [ffi.from_buffer(v) if len(v) else ffi.NULL for v in views]
    try:
        yield bufs
    finally:
        for b in bufs:
            if b is not ffi.NULL:
                ffi.release(b)


def _adopt(fd: int, snapshot: TcpSnapshot, st: Any) -> socket.socket:
    """Wrap a restored fd and remember what activate() will need."""
    sock = socket.socket(snapshot.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    return _register(sock, snapshot, st)


def _register(sock: socket.socket, snapshot: TcpSnapshot, st: Any) -> socket.socket:
    """Remember what activate() will need of a restored socket."""
    if snapshot.flags & F_NONBLOCK:
        sock.setblocking(False)
    v4 = snapshot.family == socket.AF_INET or bool(snapshot.flags & F_V4MAPPED)
    with _restored_lock:
        unsent = snapshot.unsent if snapshot.unsent_len else _EMPTY
        _restored[sock.fileno()] = _Restored(weakref.ref(sock), (snapshot, st), unsent, v4)
    return sock


def _flow(snapshot: TcpSnapshot) -> str:
    return (
        f"[{snapshot.local_addr}]:{snapshot.local_port} -> "
        f"[{snapshot.remote_addr}]:{snapshot.remote_port}"
    )


def dump(sock: FdLike) -> TcpSnapshot:
    """Read the complete state of a frozen socket. The socket itself is not changed."""
    fd = _fileno(sock)
    st = ffi.new("struct tcpr_state *")
    st.size = ffi.sizeof("struct tcpr_state")
    qp = ffi.new("uint8_t **")
    _check("dump", lib.tcpr_dump(fd, st, qp), fd)
    return _snapshot(st, st, qp[0])


def restore(snapshot: TcpSnapshot) -> socket.socket:
    """Rebuild the connection as a new socket in the calling thread's network namespace.

    The socket stays in repair mode (silent) until activate(); the local address need not be
    configured yet (IP_FREEBIND). A snapshot not made by dump() is validated first.
    """
    st = _native_state(snapshot)
    fdp = ffi.new("int *")
    with _borrowed([snapshot.queues]) as (queues,):
        rc = lib.tcpr_restore(st, queues, fdp)
    if rc:
        raise TcpRepairError("restore", rc, ffi.errno, _flow(snapshot))
    return _adopt(fdp[0], snapshot, st)


class BatchError(Exception):
    """Some sockets of a batch failed. `results` holds, per input and in order, the result or
    the TcpRepairError; `errors` maps the failed indices to their errors."""

    def __init__(self, op: str, results: list[Any]) -> None:
        self.results = results
        self.errors = {i: r for i, r in enumerate(results) if isinstance(r, TcpRepairError)}
        first = next(iter(self.errors.values()))
        super().__init__(
            f"{op}: {len(self.errors)} of {len(results)} sockets failed; first: {first}"
        )


class _Outcome:
    """Per-socket codes and errnos of one batch call."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rcs = ffi.new("int[]", n)
        self.errs = ffi.new("int[]", n)

    def errors(self, op: str, where: Any) -> dict[int, TcpRepairError]:
        """Exceptions for the failed indices only."""
        errors: dict[int, TcpRepairError] = {}
        for i in range(self.n):
            rc = self.rcs[i]
            if rc:
                cls = NotRepairable if rc in _REFUSALS else TcpRepairError
                errors[i] = cls(op, rc, self.errs[i], where(i))
        return errors


def freeze_many(socks: list[FdLike]) -> None:
    """freeze() every socket in one call into C; raises BatchError naming the failed ones
    (the others are frozen)."""
    fds = ffi.new("int[]", [_fileno(s) for s in socks])
    out = _Outcome(len(socks))
    if lib.tcpr_freeze_many(fds, len(socks), out.rcs, out.errs):
        errors = out.errors("freeze", lambda i: _describe(fds[i]))
        raise BatchError("freeze", [errors.get(i) for i in range(len(socks))])


def dump_many(socks: list[FdLike]) -> list[TcpSnapshot]:
    """dump() every socket in one call into C. On failures raises BatchError whose `results`
    keep the snapshots of the sockets that succeeded."""
    n = len(socks)
    fds = ffi.new("int[]", [_fileno(s) for s in socks])
    states = ffi.new("struct tcpr_state[]", n)
    queues = ffi.new("uint8_t *[]", n)
    out = _Outcome(n)
    failed = lib.tcpr_dump_many(fds, n, states, queues, out.rcs, out.errs)
    errors = out.errors("dump", lambda i: _describe(fds[i])) if failed else {}
    results: list[Any] = [
        errors[i] if i in errors else _snapshot(states, states + i, queues[i]) for i in range(n)
    ]
    if errors:
        raise BatchError("dump", results)
    return results


def restore_many(snapshots: list[TcpSnapshot]) -> list[socket.socket]:
    """restore() every snapshot in one call into C (in the calling thread's namespace). On
    failures raises BatchError whose `results` hold the sockets that were restored (still in
    repair mode: release() them to roll back)."""
    n = len(snapshots)
    states = [_native_state(s) for s in snapshots]
    fds = ffi.new("int[]", n)
    out = _Outcome(n)
    with _borrowed([s.queues for s in snapshots]) as bufs:
        failed = lib.tcpr_restore_many(
            ffi.new("struct tcpr_state *[]", states),
            ffi.new("uint8_t *[]", bufs),
            n,
            fds,
            out.rcs,
            out.errs,
        )
    return _restored_or_raise(
        out, failed, snapshots, lambda i: _adopt(fds[i], snapshots[i], states[i])
    )


def _restored_or_raise(
    out: _Outcome,
    failed: int,
    snapshots: list[TcpSnapshot],
    wrap: Callable[[int], socket.socket],
) -> list[socket.socket]:
    """The restored sockets (`wrap(i)` for each), or BatchError holding them and the errors."""
    errors = out.errors("restore", lambda i: _flow(snapshots[i])) if failed else {}
    results: list[Any] = [errors[i] if i in errors else wrap(i) for i in range(len(snapshots))]
    if errors:
        raise BatchError("restore", results)
    return results


def restore_into_many(socks: list[socket.socket], snapshots: list[TcpSnapshot]) -> None:
    """restore_many() into sockets the caller made — ``socket.socket(snapshot.family,
    SOCK_STREAM)``, nothing else done to them — in one call into C.

    Why: their descriptors can be handed out (to the importing application) before the state
    arrives, so that inside the freeze window only the state travels. The sockets are then
    what restore() returns (repair mode, silent, ready for activate()). On failures raises
    BatchError whose `results` hold the socket where the restore succeeded and the error
    where it did not; a failed one may be half-built in repair mode: release() them all to
    roll back (silent)."""
    n = len(socks)
    if len(snapshots) != n:
        raise ValueError(f"restore_into_many: {n} sockets for {len(snapshots)} snapshots")
    states = [_native_state(s) for s in snapshots]
    fds = ffi.new("int[]", [_fileno(s) for s in socks])
    out = _Outcome(n)
    with _borrowed([s.queues for s in snapshots]) as bufs:
        failed = lib.tcpr_restore_into_many(
            fds,
            ffi.new("struct tcpr_state *[]", states),
            ffi.new("uint8_t *[]", bufs),
            n,
            out.rcs,
            out.errs,
        )
    _restored_or_raise(
        out, failed, snapshots, lambda i: _register(socks[i], snapshots[i], states[i])
    )


def activate_many(socks: list[FdLike], acks: AckSender | None = None) -> None:
    """activate() every socket restore() or restore_many() built, in one call into C.

    Raises BatchError for the failed ones; the others are active."""
    n = len(socks)
    fds = [_fileno(s) for s in socks]
    with _restored_lock:
        missing = [i for i, fd in enumerate(fds) if fd not in _restored]
    if missing:
        raise ValueError(f"activate_many: sockets {missing[:5]} were not built by restore()")
    entries = [_take_restored(fd) for fd in fds]
    own = acks is None
    senders = _ack_sender_for(fds[0]) if acks is None and fds else (acks or AckSender())
    try:
        keep = [e.unsent for e in entries if e is not None]
        out = _Outcome(n)
        with _borrowed(keep) as unsent:
            failed = lib.tcpr_activate_many(
                ffi.new("int[]", fds),
                ffi.new("struct tcpr_state *[]", [e.state[1] for e in entries if e is not None]),
                senders.v4.fileno(),
                senders.v6.fileno(),
                ffi.new("uint8_t *[]", unsent),
                ffi.new("size_t[]", [len(u) for u in keep]),
                n,
                out.rcs,
                out.errs,
            )
    finally:
        if own:
            senders.close()
    if failed:
        errors = out.errors("activate", lambda i: _describe(fds[i]))
        raise BatchError("activate", [errors.get(i) for i in range(n)])


def release_many(socks: list[FdLike]) -> None:
    """release() every socket in one call into C; raises BatchError for the failed ones."""
    fds = [_fileno(s) for s in socks]
    for s in socks:
        if isinstance(s, socket.socket):
            s.detach()
    with _restored_lock:
        for fd in fds:
            _restored.pop(fd, None)
    out = _Outcome(len(fds))
    if lib.tcpr_release_many(ffi.new("int[]", fds), len(fds), out.rcs, out.errs):
        errors = out.errors("release", lambda i: f"fd {fds[i]}")
        for i, err in errors.items():
            if err.code == _E_REPAIR_ON:
                # Still open and not silent: hand it back instead of leaking it.
                err.socket = socket.socket(fileno=fds[i])  # type: ignore[attr-defined]
        raise BatchError("release", [errors.get(i) for i in range(len(fds))])


def _take_restored(fd: int) -> _Restored | None:
    with _restored_lock:
        entry = _restored.pop(fd, None)
    if entry is None:
        return None
    sock = entry.sock()
    return entry if sock is not None and sock.fileno() == fd else None


class AckSender(Closing):
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


_SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of the socket's network namespace


def _ack_sender_for(fd: int) -> AckSender:
    """A temporary AckSender in the namespace the socket lives in (not the caller's)."""
    from sessmob import netns

    ns = fcntl.ioctl(fd, _SIOCGSKNS)
    try:
        with netns.entered(ns):
            return AckSender()
    finally:
        os.close(ns)


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
    senders = _ack_sender_for(fd) if acks is None else acks
    try:
        raw = (senders.v4 if entry.v4 else senders.v6).fileno()
        with _borrowed([entry.unsent]) as (unsent,):
            rc = lib.tcpr_activate_ack(fd, entry.state[1], raw, unsent, len(entry.unsent))
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
