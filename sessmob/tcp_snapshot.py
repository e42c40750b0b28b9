"""TcpSnapshot: the dumped state of one TCP connection, and its versioned byte format.

A snapshot crosses trust boundaries (it is sent from one device to another), so decoding
validates every field before anything is built from it, and refuses hostile input with a
SnapshotError (a ValueError) — never a crash, a hang or an allocation sized by the input.

Byte format, version 1 (little-endian; docs/tcp_repair.md has the field table):
a fixed header of HEADER_V1.size bytes, then `inq_len` receive-queue bytes, then `outq_len`
send-queue bytes; nothing else. The queues are kept in one contiguous buffer so that a
snapshot decoded from bytes (or dumped by the native helper) restores without copying.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field, fields
from typing import Any

MAGIC = b"SMTS"
VERSION = 1
TCP_ESTABLISHED = 1
# linux/tcp.h state numbers of the states a snapshot may hold (see docs/tcp_repair.md).
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_CLOSING = 11
OUR_FIN_STATES = frozenset({TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK, TCP_CLOSING})
PEER_FIN_STATES = frozenset({TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING})
STATES = frozenset({TCP_ESTABLISHED}) | OUR_FIN_STATES | PEER_FIN_STATES
DEFAULT_MAX_QUEUE = 64 << 20

# Flag bits, the same values as TCPR_F_* in csrc/tcp_repair.h.
F_TIMESTAMP = 0x0001
F_SACK = 0x0002
F_WSCALE = 0x0004
F_WINDOW = 0x0008
F_V4MAPPED = 0x0010
F_FIN_UNSENT = 0x0020
F_NODELAY = 0x0100
F_CORK = 0x0200
F_KEEPALIVE = 0x0400
F_NONBLOCK = 0x0800
F_ALL = 0x0F3F

HEADER_V1 = struct.Struct(
    "<4sHHI"  # magic, version, header length, flags
    "BBBB"  # family (4 or 6), tcp state, snd_wscale, rcv_wscale
    "16s16sHH"  # local addr, remote addr, local port, remote port
    "IIIII"  # snd_seq, rcv_seq, inq_len, outq_len, unsent_len
    "II"  # mss_clamp, ts_val
    "IIIII"  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
    "iiiI"  # keepidle, keepintvl, keepcnt, user_timeout
    "iiiI"  # sndbuf, rcvbuf, buf_lock, mark
    "ii16s"  # tos, ttl, congestion control name
)

_INT32_MAX = 2**31 - 1
_V4MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_CC_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_-")


_CHECKED = (None, None)  # _native of a decoded (validated) snapshot without native state


class SnapshotError(ValueError):
    """A snapshot (or its byte form) is malformed, truncated, oversized or inconsistent."""


class UnsupportedVersion(SnapshotError):
    """The byte form is of a version this sessmob does not read."""


@dataclass(slots=True, eq=False, frozen=True)
class TcpSnapshot:
    """Everything needed to rebuild one TCP connection on another device.

    Sequence numbers follow the kernel's TCP_QUEUE_SEQ: `snd_seq` is the sequence number after
    the last byte of the send queue, `rcv_seq` the one after the last byte of the receive
    queue. `queues` holds the receive queue followed by the send queue; the last `unsent_len`
    bytes of the send queue were never transmitted.
    """

    family: int  # socket.AF_INET or socket.AF_INET6 (the socket's domain)
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    flags: int
    tcp_state: int
    snd_seq: int
    rcv_seq: int
    inq_len: int
    outq_len: int
    unsent_len: int
    mss_clamp: int
    snd_wscale: int
    rcv_wscale: int
    ts_val: int
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    keepidle: int
    keepintvl: int
    keepcnt: int
    user_timeout: int
    sndbuf: int
    rcvbuf: int
    buf_lock: int
    mark: int
    tos: int
    ttl: int
    congestion: str
    queues: memoryview
    # The native state this snapshot was dumped into (or already converted to), kept so that
    # restoring costs no conversion: (owner, struct pointer); (None, None) for a snapshot
    # validated by from_bytes that has no native state yet. Set means "checked": a dumped one
    # comes from the kernel through our own helper, the others passed validate(). Frozen: it
    # cannot go stale; and not an __init__ argument, so that dataclasses.replace() starts the
    # copy without it (and validates it again).
    _native: Any = field(default=None, init=False, repr=False, compare=False)

    # -- views ---------------------------------------------------------------------------

    @property
    def recv_queue(self) -> memoryview:
        """Bytes received and not yet read by the application."""
        return self.queues[: self.inq_len]

    @property
    def send_queue(self) -> memoryview:
        """Bytes written by the application and not yet acknowledged by the peer."""
        return self.queues[self.inq_len :]

    @property
    def unsent(self) -> memoryview:
        """The never-transmitted tail of the send queue."""
        return self.queues[len(self.queues) - self.unsent_len :]

    @property
    def local(self) -> tuple[str, int]:
        return (self.local_addr, self.local_port)

    @property
    def remote(self) -> tuple[str, int]:
        return (self.remote_addr, self.remote_port)

    def __repr__(self) -> str:
        return (
            f"TcpSnapshot({self.local_addr}:{self.local_port} -> "
            f"{self.remote_addr}:{self.remote_port}, state={self.tcp_state}, "
            f"rcv_seq={self.rcv_seq}, snd_seq={self.snd_seq}, inq={self.inq_len}, "
            f"outq={self.outq_len}, unsent={self.unsent_len})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TcpSnapshot):
            return NotImplemented
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in fields(self)
            if f.name not in ("queues", "_native")
        ) and bytes(self.queues) == bytes(other.queues)

    # -- checks --------------------------------------------------------------------------

    def validate(self, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        """Raise SnapshotError unless every field is in range and the parts agree."""
        _validate(self, max_queue)

    # -- byte form -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Encode as version-1 bytes (header + receive queue + send queue)."""
        if self._native is None:  # dumped or decoded ones were checked already
            self.validate(max_queue=_INT32_MAX)
        header = HEADER_V1.pack(
            MAGIC,
            VERSION,
            HEADER_V1.size,
            self.flags,
            4 if self.family == socket.AF_INET else 6,
            self.tcp_state,
            self.snd_wscale,
            self.rcv_wscale,
            _pack_addr(self.family, self.local_addr),
            _pack_addr(self.family, self.remote_addr),
            self.local_port,
            self.remote_port,
            self.snd_seq,
            self.rcv_seq,
            self.inq_len,
            self.outq_len,
            self.unsent_len,
            self.mss_clamp,
            self.ts_val,
            self.snd_wl1,
            self.snd_wnd,
            self.max_window,
            self.rcv_wnd,
            self.rcv_wup,
            self.keepidle,
            self.keepintvl,
            self.keepcnt,
            self.user_timeout,
            self.sndbuf,
            self.rcvbuf,
            self.buf_lock,
            self.mark,
            self.tos,
            self.ttl,
            self.congestion.encode("ascii"),
        )
        return b"".join((header, self.queues))

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, *, max_queue: int = DEFAULT_MAX_QUEUE
    ) -> TcpSnapshot:
        """Decode and validate. The queues stay a view of `data` (no copy)."""
        view = memoryview(data).cast("B")
        if len(view) < 8:
            raise SnapshotError(f"TCP snapshot truncated: {len(view)} bytes, header needs 8")
        if bytes(view[:4]) != MAGIC:
            raise SnapshotError(f"not a TCP snapshot: magic {bytes(view[:4])!r} != {MAGIC!r}")
        version, header_len = struct.unpack_from("<HH", view, 4)
        if version != VERSION:
            raise UnsupportedVersion(
                f"TCP snapshot version {version} is not supported (this sessmob reads {VERSION})"
            )
        if header_len != HEADER_V1.size:
            raise SnapshotError(
                f"TCP snapshot header length {header_len} != {HEADER_V1.size} for version 1"
            )
        if len(view) < header_len:
            raise SnapshotError(
                f"TCP snapshot truncated: {len(view)} bytes, header needs {header_len}"
            )
        f = HEADER_V1.unpack_from(view, 0)
        (_, _, _, flags, fam, state, snd_ws, rcv_ws, laddr, raddr, lport, rport) = f[:12]
        (snd_seq, rcv_seq, inq_len, outq_len, unsent_len, mss, ts_val) = f[12:19]
        (wl1, swnd, maxw, rwnd, rwup, kidle, kintvl, kcnt, uto) = f[19:28]
        (sndbuf, rcvbuf, buf_lock, mark, tos, ttl, cc_raw) = f[28:35]
        for name, n in (("receive", inq_len), ("send", outq_len)):
            if n > max_queue:
                raise SnapshotError(
                    f"TCP snapshot {name} queue of {n} bytes exceeds the limit of {max_queue}"
                )
        expected = header_len + inq_len + outq_len
        if len(view) != expected:
            what = "truncated" if len(view) < expected else "has trailing bytes"
            raise SnapshotError(
                f"TCP snapshot {what}: {len(view)} bytes, header says {expected} "
                f"({header_len} header + {inq_len} receive + {outq_len} send queue)"
            )
        if fam not in (4, 6):
            raise SnapshotError(f"TCP snapshot family {fam} is neither 4 nor 6")
        family = socket.AF_INET if fam == 4 else socket.AF_INET6
        snap = cls(
            family=family,
            local_addr=_unpack_addr(family, laddr, "local"),
            local_port=lport,
            remote_addr=_unpack_addr(family, raddr, "remote"),
            remote_port=rport,
            flags=flags,
            tcp_state=state,
            snd_seq=snd_seq,
            rcv_seq=rcv_seq,
            inq_len=inq_len,
            outq_len=outq_len,
            unsent_len=unsent_len,
            mss_clamp=mss,
            snd_wscale=snd_ws,
            rcv_wscale=rcv_ws,
            ts_val=ts_val,
            snd_wl1=wl1,
            snd_wnd=swnd,
            max_window=maxw,
            rcv_wnd=rwnd,
            rcv_wup=rwup,
            keepidle=kidle,
            keepintvl=kintvl,
            keepcnt=kcnt,
            user_timeout=uto,
            sndbuf=sndbuf,
            rcvbuf=rcvbuf,
            buf_lock=buf_lock,
            mark=mark,
            tos=tos,
            ttl=ttl,
            congestion=_unpack_cc(cc_raw),
            queues=view[header_len:],
        )
        snap.validate(max_queue)
        object.__setattr__(snap, "_native", _CHECKED)
        return snap


def _pack_addr(family: int, addr: str) -> bytes:
    return socket.inet_pton(family, addr).ljust(16, b"\0")


def _unpack_addr(family: int, raw: bytes, which: str) -> str:
    if family == socket.AF_INET:
        if any(raw[4:]):
            raise SnapshotError(f"TCP snapshot {which} IPv4 address has non-zero padding")
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _unpack_cc(raw: bytes) -> str:
    name, nul, pad = raw.partition(b"\0")
    if not nul or any(pad):
        raise SnapshotError("TCP snapshot congestion control name is not NUL-terminated")
    if not set(name) <= _CC_CHARS:
        raise SnapshotError(f"TCP snapshot congestion control name {name!r} has bad characters")
    return name.decode("ascii")


def _in(value: int, lo: int, hi: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SnapshotError(f"TCP snapshot {what} = {value!r} is outside {lo}..{hi}")


def _validate(s: TcpSnapshot, max_queue: int) -> None:
    u32 = 2**32 - 1
    if s.family not in (socket.AF_INET, socket.AF_INET6):
        raise SnapshotError(f"TCP snapshot family {s.family!r} is neither AF_INET nor AF_INET6")
    _in(s.flags, 0, u32, "flags")  # before the v4-mapped check below uses it
    want = 4 if s.family == socket.AF_INET else 6
    for what, addr in (("local", s.local_addr), ("remote", s.remote_addr)):
        try:
            packed = socket.inet_pton(s.family, addr)
        except (OSError, TypeError, ValueError):
            raise SnapshotError(f"TCP snapshot {what} address {addr!r} is not IPv{want}") from None
        mapped = want == 6 and packed[:12] == _V4MAPPED_PREFIX
        if mapped != bool(s.flags & F_V4MAPPED):
            raise SnapshotError(
                f"TCP snapshot {what} address {addr} disagrees with the v4-mapped flag"
            )
    if s.flags & ~F_ALL:
        raise SnapshotError(f"TCP snapshot has unknown flag bits {s.flags & ~F_ALL:#x}")
    if s.tcp_state not in STATES:
        raise SnapshotError(
            f"TCP snapshot state {s.tcp_state!r} cannot be restored (only ESTABLISHED, "
            f"FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING: {sorted(STATES)})"
        )
    if s.flags & F_FIN_UNSENT and s.tcp_state not in OUR_FIN_STATES:
        raise SnapshotError("TCP snapshot has an unsent FIN in a state without our FIN")
    _in(s.local_port, 1, 65535, "local port")
    _in(s.remote_port, 1, 65535, "remote port")
    for name in ("snd_seq", "rcv_seq", "ts_val", "snd_wl1", "snd_wnd", "max_window"):
        _in(getattr(s, name), 0, u32, name)
    for name in ("rcv_wnd", "rcv_wup", "mark"):
        _in(getattr(s, name), 0, u32, name)
    _in(s.inq_len, 0, max_queue, "receive queue length")
    _in(s.outq_len, 0, max_queue, "send queue length")
    _in(s.unsent_len, 0, s.outq_len, "unsent length (must not exceed the send queue)")
    if len(s.queues) != s.inq_len + s.outq_len:
        raise SnapshotError(
            f"TCP snapshot holds {len(s.queues)} queue bytes, lengths say "
            f"{s.inq_len} + {s.outq_len}"
        )
    _in(s.mss_clamp, 1, 65535, "mss_clamp")
    ws_max = 14 if s.flags & F_WSCALE else 0
    _in(s.snd_wscale, 0, ws_max, "snd_wscale")
    _in(s.rcv_wscale, 0, ws_max, "rcv_wscale")
    if not s.flags & F_TIMESTAMP and s.ts_val:
        raise SnapshotError("TCP snapshot has a timestamp value but timestamps are off")
    if s.flags & F_WINDOW and (s.rcv_seq - s.rcv_wup) % 2**32 >= 2**31:
        raise SnapshotError("TCP snapshot rcv_wup lies after rcv_seq")
    _in(s.keepidle, 1, 32767, "keepidle")
    _in(s.keepintvl, 1, 32767, "keepintvl")
    _in(s.keepcnt, 1, 127, "keepcnt")
    _in(s.user_timeout, 0, _INT32_MAX, "user_timeout")
    _in(s.sndbuf, 0, _INT32_MAX, "sndbuf")
    _in(s.rcvbuf, 0, _INT32_MAX, "rcvbuf")
    _in(s.buf_lock, 0, 3, "buf_lock")
    _in(s.tos, 0, 255, "tos")
    if s.ttl != -1:
        _in(s.ttl, 1, 255, "ttl")
    if not isinstance(s.congestion, str) or len(s.congestion) > 15:
        raise SnapshotError(f"TCP snapshot congestion name {s.congestion!r} is too long")
    if not set(s.congestion.encode("ascii", "replace")) <= _CC_CHARS:
        raise SnapshotError(f"TCP snapshot congestion name {s.congestion!r} has bad characters")
