"""The verified-stream pattern: deterministic, and every gap, duplicate or corruption is caught."""

from __future__ import annotations

import random
import socket
import time

import pytest

from netns_testbed.counters import CnCounters, _parse, diff
from netns_testbed.stream import (
    MAX_SLICE,
    PERIOD,
    PatternChecker,
    PatternMismatch,
    PatternWriter,
    StreamEndpoint,
    StreamError,
    pattern_buffer,
    pattern_bytes,
)


def test_period_is_odd_and_buffer_wraps() -> None:
    assert PERIOD % 2 == 1 and PERIOD & (PERIOD - 1) != 0
    buf = pattern_buffer(7)
    assert len(buf) == PERIOD + MAX_SLICE
    assert buf[PERIOD:] == buf[:MAX_SLICE]
    assert pattern_buffer(7) is buf  # cached per process
    assert pattern_buffer(8)[:64] != buf[:64]


def test_deterministic_per_seed() -> None:
    assert pattern_bytes(3, 1000, 100) == random.Random(3).randbytes(1100)[1000:]


def test_writer_wraps_around_period() -> None:
    w = PatternWriter(5, offset=PERIOD - 100)
    data = bytes(w.take(300))
    buf = pattern_buffer(5)
    assert data == buf[PERIOD - 100 : PERIOD] + buf[:200]
    assert w.offset == PERIOD + 200
    assert bytes(w.peek(10)) == buf[200:210]


def test_writer_rejects_oversized_chunk() -> None:
    with pytest.raises(ValueError):
        PatternWriter(1).peek(MAX_SLICE + 1)


def test_checker_accepts_stream_across_wrap_in_odd_chunks() -> None:
    w = PatternWriter(9, offset=PERIOD - 5000)
    c = PatternChecker(9, offset=PERIOD - 5000)
    sizes = [1, 7, 4096, 1448, 3, 65536, 12345]
    for s in sizes * 3:
        c.feed(bytes(w.take(s)))
    assert c.offset == w.offset and c.error is None


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_checker_input_types_and_chunk_boundaries(kind: str) -> None:
    data = pattern_bytes(11, 0, 3 * MAX_SLICE + 17)  # larger than one contiguous slice
    c = PatternChecker(11)
    conv = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind]
    c.feed(conv(data[:1]))
    c.feed(conv(data[1 : 2 * MAX_SLICE + 3]))
    c.feed(conv(data[2 * MAX_SLICE + 3 :]))
    assert c.offset == len(data)


def test_gap_detected_at_offset() -> None:
    data = pattern_bytes(1, 0, 100_000)
    c = PatternChecker(1)
    c.feed(data[:50_000])
    with pytest.raises(PatternMismatch) as ei:
        c.feed(data[50_010:60_000])  # 10 bytes skipped
    assert ei.value.offset == 50_000
    assert "gap: 10 bytes" in ei.value.diagnosis
    assert c.offset == 50_000
    with pytest.raises(PatternMismatch):  # stays broken
        c.feed(data[50_000:50_100])


def test_duplicate_detected_at_offset() -> None:
    data = pattern_bytes(1, 0, 100_000)
    c = PatternChecker(1)
    c.feed(data[:50_000])
    with pytest.raises(PatternMismatch) as ei:
        c.feed(data[49_000:60_000])  # 1000 bytes repeated
    assert ei.value.offset == 50_000
    assert "duplicate: 1000 bytes" in ei.value.diagnosis


def test_duplicate_across_wrap_detected() -> None:
    start = PERIOD - 20
    data = pattern_bytes(2, start, 200)
    c = PatternChecker(2, offset=start)
    c.feed(data[:40])  # now past the wrap
    with pytest.raises(PatternMismatch) as ei:
        c.feed(data[30:100])
    assert ei.value.offset == start + 40
    assert "duplicate: 10 bytes" in ei.value.diagnosis


def test_corrupted_byte_inside_chunk() -> None:
    data = bytearray(pattern_bytes(4, 0, 10_000))
    data[7777] ^= 0x01
    c = PatternChecker(4)
    with pytest.raises(PatternMismatch) as ei:
        c.feed(data)
    assert ei.value.offset == 7777
    assert ei.value.got == ei.value.expected ^ 1
    assert "corrupted byte" in ei.value.diagnosis


def test_wrong_seed_detected_immediately() -> None:
    c = PatternChecker(1)
    with pytest.raises(PatternMismatch) as ei:
        c.feed(pattern_bytes(2, 0, 4096))
    assert ei.value.offset < 4
    assert "not from this pattern" in ei.value.diagnosis


def test_endpoint_over_socketpair_pause_swap_finish() -> None:
    """No netns needed: both ends in-process over a socketpair (AF_UNIX stream)."""
    a, b = socket.socketpair()
    ea = StreamEndpoint(a, tx_seed=1, rx_seed=2, rate=2_000_000)
    eb = StreamEndpoint(b, tx_seed=2, rx_seed=1, rate=None)
    try:
        ea.start()
        eb.start()
        time.sleep(0.1)
        ea.pause()
        assert ea.stats.paused
        a2 = a.dup()
        ea.swap_socket(a2)
        ea.resume()
        time.sleep(0.1)
        eb.stop_sending()
        ra = ea.finish(5.0)
        rb = eb.finish(5.0)
        assert ra.ok and rb.ok
        assert ra.tx_bytes == rb.rx_bytes > 100_000
        assert rb.tx_bytes == ra.rx_bytes > 0
        a2.close()
    finally:
        ea.close()
        eb.close()
        a.close()
        b.close()


def test_endpoint_reports_mismatch_from_wrong_seed() -> None:
    a, b = socket.socketpair()
    ea = StreamEndpoint(a, tx_seed=1, rx_seed=2, rate=0)
    try:
        ea.start()
        b.sendall(pattern_bytes(3, 0, 10_000))
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(StreamError, match="mismatch at offset 0"):
            ea.finish(2.0)
    finally:
        ea.close()
        a.close()
        b.close()


def test_swap_socket_requires_pause() -> None:
    a, b = socket.socketpair()
    ea = StreamEndpoint(a, tx_seed=1, rx_seed=2, rate=0)
    try:
        ea.start()
        with pytest.raises(StreamError, match="paused"):
            ea.swap_socket(a)
    finally:
        ea.close()
        a.close()
        b.close()


def test_counters_parse_and_summary() -> None:
    out: dict[str, int] = {}
    _parse(
        "Ip: Forwarding\nIp: 1\nTcp: OutRsts EstabResets AttemptFails RetransSegs MaxConn\n"
        "Tcp: 1 2 3 4 -1\n",
        "snmp",
        out,
    )
    _parse("TcpExt: TCPLossProbes TCPTimeouts\nTcpExt: 5 6\n", "netstat", out)
    assert out["Tcp.MaxConn"] == -1 and "Ip.Forwarding" not in out
    after = {k: v + 1 for k, v in out.items()}
    assert set(diff(out, after).values()) == {1}
    s = CnCounters.between(out, after)
    assert (s.resets, s.rto, s.tlp, s.retrans_segs) == (3, 1, 1, 1)
