"""Size of the exchange document (issue 4: "a session's exchange document is its queued bytes
plus under 1 KiB per flow").

The payload a document must carry is the session's own bytes: every TCP flow's receive and send
queue, the queued UDP datagrams and the application state blobs. Everything else — framing,
names, addresses, the TCP snapshot headers — is overhead, and it must stay under 1 KiB per flow
whatever the queues hold: no per-byte cost (no text encoding of the queues) and no copy twice.
Names are taken at their longest allowed lengths, so this is a worst case for them.
"""

from __future__ import annotations

import random
import socket

import pytest

from sessmob.exchange import AppState, ExchangeDoc, FlowState, UdpState, decode, encode
from sessmob.tcp_snapshot import TcpSnapshot
from tests.snapshots import established

KIB = 1024
NAME64 = "s" * 60 + "-9.Z"  # [A-Za-z0-9_.-]{1,64}, at its longest
TYPE64 = "echo." + "x" * 59  # [a-z0-9_.-]{1,64}
_PATTERN = bytes(range(251))  # a prime length: queues of neighbouring flows differ


def tcp_snapshot(v6: bool, inq: int, outq: int, port: int) -> TcpSnapshot:
    """An established connection's snapshot with `inq`/`outq` queued bytes (as in
    tests/unit/test_exchange.py), every field at a plausible value."""
    family, local, remote = (
        (socket.AF_INET6, "2001:db8:1::100", "2001:db8:1::1")
        if v6
        else (socket.AF_INET, "192.0.2.100", "192.0.2.1")
    )
    n = inq + outq
    queues = (_PATTERN * (n // len(_PATTERN) + 2))[port % 251 : port % 251 + n]
    return established(
        family, (local, port), (remote, 7000), queues[:inq], queues[inq:], outq // 3,
        mss_clamp=1428, keepidle=7200, keepintvl=75, keepcnt=9, sndbuf=2626560, rcvbuf=6291456,
    )  # fmt: skip


def session(
    queue_sizes: list[tuple[int, int]], v6: bool = True, blob: bytes = b""
) -> tuple[ExchangeDoc, int]:
    """A session with one TCP flow per (inq, outq); (document, payload bytes it carries)."""
    flows = [
        FlowState(f"{i:032d}", "tcp", tcp=tcp_snapshot(v6, inq, outq, 1024 + i))
        for i, (inq, outq) in enumerate(queue_sizes)
    ]
    doc = ExchangeDoc(
        session_id=NAME64,
        session_type=TYPE64,
        source=NAME64,
        addresses=["2001:db8:1::100/64", "192.0.2.100/24"],
        apps=[AppState(TYPE64, blob)] if blob else [],
        flows=flows,
    )
    return doc, sum(i + o for i, o in queue_sizes) + len(blob)


def sizes(n: int, seed: int, biggest: int) -> list[tuple[int, int]]:
    """n (inq, outq) pairs: empty, small and large queues mixed."""
    rng = random.Random(seed)
    pick = [0, 1, 100, 1448, 65535, 65536, biggest]
    return [(rng.choice(pick), rng.choice(pick)) for _ in range(n)]


@pytest.mark.parametrize("v6", [True, False], ids=["ipv6", "ipv4"])
@pytest.mark.parametrize(
    ("n", "biggest"), [(1, 4 << 20), (2, 1 << 20), (16, 1 << 20), (256, 70000), (1024, 3000)]
)
def test_document_is_queued_bytes_plus_under_1_kib_per_flow(v6: bool, n: int, biggest: int) -> None:
    doc, queued = session(sizes(n, n, biggest), v6, blob=bytes(range(256)) * 4)
    data = encode(doc)
    overhead = len(data) - queued
    assert 0 < overhead < KIB * n, f"{n} flows, {queued} B queued: {overhead} B overhead"
    assert decode(data) == doc  # every queued byte is really in there


@pytest.mark.parametrize("n", [1, 7, 64])
def test_overhead_does_not_grow_with_the_queues(n: int) -> None:
    """Queues go in as they are: 1 MiB more per flow costs 1 MiB and a few length bytes."""
    empty, _ = session([(0, 0)] * n)
    full, queued = session([(512 * KIB, 512 * KIB)] * n)
    growth = len(encode(full)) - len(encode(empty))
    # a bin length grows from 1 to 4 bytes; nothing else may change
    assert queued <= growth <= queued + 3 * n, (queued, growth)


def test_empty_flow_overhead_is_well_under_the_budget() -> None:
    """One flow with nothing queued, long names: the session's whole framing fits in 1 KiB."""
    doc, queued = session([(0, 0)])
    assert queued == 0
    assert len(encode(doc)) < KIB


def test_udp_flow_overhead_is_per_flow_plus_per_datagram() -> None:
    """UDP has no queue blob: each queued datagram carries its source address and port, so a
    UDP flow costs under 1 KiB plus a bounded amount per datagram still queued (at most
    Limits.max_udp_datagrams of them)."""
    per_datagram = 64
    for count in (0, 1, 100, 1000):
        payloads = [bytes([i & 0xFF]) * (i % 1500) for i in range(count)]
        u = UdpState(
            family=socket.AF_INET6,
            local=("2001:db8:1::100", 7000),
            remote=("2001:db8:1::1", 40000),
            options={"sndbuf": 212992, "rcvbuf": 212992, "tos": 0, "ttl": 64, "mark": 0},
            queued=[("2001:db8:1:0:ffff:ffff:ffff:ffff", 65535, p) for p in payloads],
        )
        doc = ExchangeDoc(NAME64, TYPE64, NAME64, flows=[FlowState("u" * 32, "udp", udp=u)])
        overhead = len(encode(doc)) - sum(len(p) for p in payloads)
        assert overhead < KIB + per_datagram * count, (count, overhead)
