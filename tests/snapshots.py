"""Hand-built TcpSnapshots for unit tests: an established connection with every field at a
plausible value, so each test file only states what it varies (addresses, queues, and the
fields its golden vectors pin)."""

from __future__ import annotations

from typing import Any

from sessmob.tcp_snapshot import TcpSnapshot

BASE: dict[str, Any] = dict(
    flags=0x0001 | 0x0002 | 0x0004 | 0x0008 | 0x0100,  # ts, sack, wscale, window, nodelay
    tcp_state=1,
    snd_seq=0xFFFFFF00,  # about to wrap
    rcv_seq=0x12345678,
    mss_clamp=1448,
    snd_wscale=7,
    rcv_wscale=9,
    ts_val=0x89ABCDEF,
    snd_wl1=0x12345000,
    snd_wnd=64000,
    max_window=262144,
    rcv_wnd=131072,
    rcv_wup=0x12345600,
    keepidle=60,
    keepintvl=10,
    keepcnt=5,
    user_timeout=0,
    sndbuf=87040,
    rcvbuf=131072,
    buf_lock=0,
    mark=0,
    tos=0,
    ttl=64,
    congestion="cubic",
)


def established(
    family: int,
    local: tuple[str, int],
    remote: tuple[str, int],
    inq: bytes = b"",
    outq: bytes = b"",
    unsent: int = 0,
    **over: Any,
) -> TcpSnapshot:
    """A valid snapshot with these queues; `over` replaces any other field."""
    fields = dict(
        BASE,
        family=family,
        local_addr=local[0],
        local_port=local[1],
        remote_addr=remote[0],
        remote_port=remote[1],
        inq_len=len(inq),
        outq_len=len(outq),
        unsent_len=unsent,
        queues=memoryview(inq + outq),
    )
    fields.update(over)
    return TcpSnapshot(**fields)
