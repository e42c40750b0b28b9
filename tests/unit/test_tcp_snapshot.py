"""The TCP snapshot byte format: faithful round trips, and hostile input refused.

A snapshot crosses from one device to another, so `TcpSnapshot.from_bytes` must turn every
malformed, truncated, oversized or inconsistent input into a SnapshotError (a ValueError) with a
message saying what is wrong — never another exception, a hang or an allocation sized by the
input — and whatever it accepts must encode back to exactly the same bytes.
"""

from __future__ import annotations

import random
import socket
import struct
import time
import tracemalloc
from dataclasses import replace
from typing import Any

import pytest

from sessmob.tcp_snapshot import (
    DEFAULT_MAX_QUEUE,
    F_ALL,
    F_FIN_UNSENT,
    F_KEEPALIVE,
    F_NODELAY,
    F_SACK,
    F_TIMESTAMP,
    F_V4MAPPED,
    F_WINDOW,
    F_WSCALE,
    HEADER_V1,
    MAGIC,
    VERSION,
    SnapshotError,
    TcpSnapshot,
    UnsupportedVersion,
)
from tests.snapshots import established

# Field names of HEADER_V1, in order (the golden vector below pins the layout itself).
HEADER_FIELDS = (
    "magic", "version", "header_len", "flags", "family", "tcp_state", "snd_wscale",
    "rcv_wscale", "local_addr", "remote_addr", "local_port", "remote_port", "snd_seq",
    "rcv_seq", "inq_len", "outq_len", "unsent_len", "mss_clamp", "ts_val", "snd_wl1",
    "snd_wnd", "max_window", "rcv_wnd", "rcv_wup", "keepidle", "keepintvl", "keepcnt",
    "user_timeout", "sndbuf", "rcvbuf", "buf_lock", "mark", "tos", "ttl", "congestion",
)  # fmt: skip

TYPICAL_FLAGS = F_TIMESTAMP | F_SACK | F_WSCALE | F_WINDOW


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def snap(
    kind: str = "ipv4",
    inq: bytes = b"",
    outq: bytes = b"",
    unsent: int = 0,
    **over: Any,
) -> TcpSnapshot:
    """A snapshot as a dump of a busy connection would produce it."""
    family, local, remote, flags = {
        "ipv4": (socket.AF_INET, "192.0.2.10", "192.0.2.200", 0),
        "ipv6": (socket.AF_INET6, "2001:db8::10", "2001:db8:1::200", 0),
        "v4mapped": (socket.AF_INET6, "::ffff:192.0.2.10", "::ffff:192.0.2.200", F_V4MAPPED),
    }[kind]
    fields: dict[str, Any] = dict(
        flags=TYPICAL_FLAGS | F_NODELAY | F_KEEPALIVE | flags,
        user_timeout=30000,
        mark=0x2A,
        tos=0x28,
    )
    fields.update(over)
    return established(family, (local, 40321), (remote, 443), inq, outq, unsent, **fields)


def header_of(data: bytes) -> dict[str, Any]:
    values = HEADER_V1.unpack_from(data, 0)
    assert len(values) == len(HEADER_FIELDS)
    return dict(zip(HEADER_FIELDS, values, strict=True))


def patched(data: bytes, **changes: Any) -> bytes:
    """The encoding with some header fields replaced (the body is kept as is)."""
    h = header_of(data)
    for k, v in changes.items():
        assert k in h, k
        h[k] = v
    return HEADER_V1.pack(*h.values()) + data[HEADER_V1.size :]


VALID = snap("ipv4", inq=pattern(50, 1), outq=pattern(70, 2), unsent=30).to_bytes()


def refused(data: bytes | bytearray | memoryview, match: str, **kw: Any) -> SnapshotError:
    """from_bytes must raise SnapshotError (nothing else) whose message matches."""
    with pytest.raises(SnapshotError, match=match) as info:
        TcpSnapshot.from_bytes(data, **kw)
    return info.value


# -- round trips ----------------------------------------------------------------------------

ROUND_TRIPS = {
    "ipv4-empty-queues": snap("ipv4"),
    "ipv6-empty-queues": snap("ipv6"),
    "v4mapped-empty-queues": snap("v4mapped"),
    "ipv4-recv-only": snap("ipv4", inq=pattern(1000, 1)),
    "ipv6-send-only-all-acked": snap("ipv6", outq=pattern(1000, 2)),
    "v4mapped-both-with-unsent-tail": snap(
        "v4mapped", inq=pattern(300, 3), outq=pattern(500, 4), unsent=200
    ),
    "ipv6-send-queue-all-unsent": snap("ipv6", outq=pattern(64, 5), unsent=64),
    "ipv4-1MiB-queues": snap("ipv4", inq=pattern(1 << 20, 6), outq=pattern(1 << 20, 7), unsent=1),
    "ipv4-minimal-options": snap(
        "ipv4", flags=0, snd_wscale=0, rcv_wscale=0, ts_val=0, congestion="", ttl=-1
    ),
    "ipv6-extremes": snap(
        "ipv6",
        inq=b"\x00",
        outq=b"\xff",
        local_port=1,
        remote_port=65535,
        flags=F_ALL & ~F_V4MAPPED,
        tcp_state=4,  # FIN_WAIT1: F_FIN_UNSENT needs a state with our FIN
        snd_seq=0xFFFFFFFF,
        rcv_seq=0,
        rcv_wup=0,  # rcv_wup == rcv_seq is the latest it may be
        mss_clamp=65535,
        snd_wscale=14,
        rcv_wscale=14,
        ts_val=0xFFFFFFFF,
        keepidle=32767,
        keepintvl=32767,
        keepcnt=127,
        user_timeout=2**31 - 1,
        sndbuf=2**31 - 1,
        rcvbuf=0,
        buf_lock=3,
        mark=0xFFFFFFFF,
        tos=255,
        ttl=255,
        congestion="a_b-c0123456789",  # 15 characters, the longest name
    ),
}


@pytest.mark.parametrize("original", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_is_exact(original: TcpSnapshot) -> None:
    data = original.to_bytes()
    assert len(data) == HEADER_V1.size + original.inq_len + original.outq_len
    assert data[:4] == MAGIC
    decoded = TcpSnapshot.from_bytes(data)
    assert decoded == original
    assert decoded.to_bytes() == data
    assert bytes(decoded.recv_queue) == bytes(original.queues[: original.inq_len])
    assert bytes(decoded.send_queue) == bytes(original.queues[original.inq_len :])
    assert len(decoded.unsent) == original.unsent_len
    tail = len(original.queues) - original.unsent_len
    assert bytes(decoded.unsent) == bytes(original.queues)[tail:]


def test_decoding_accepts_bytes_bytearray_and_memoryview_slices() -> None:
    for data in (VALID, bytearray(VALID), memoryview(b"junk" + VALID + b"junk")[4:-4]):
        assert TcpSnapshot.from_bytes(data).to_bytes() == VALID


def test_queues_are_views_of_the_input_not_copies() -> None:
    buf = bytearray(VALID)
    s = TcpSnapshot.from_bytes(buf)
    assert s.queues.obj is buf
    buf[HEADER_V1.size] ^= 0xFF  # first receive-queue byte
    buf[-1] ^= 0xFF  # last send-queue (unsent) byte
    assert s.recv_queue[0] == buf[HEADER_V1.size]
    assert s.unsent[-1] == buf[-1]
    data = bytes(VALID)
    assert TcpSnapshot.from_bytes(data).queues.obj is data


def test_golden_v1_encoding() -> None:
    """The version-1 layout is a wire format: changing it needs a new version number."""
    s = snap("ipv4", inq=b"AB", outq=b"CDE", unsent=1)
    assert HEADER_V1.size == 156
    assert s.to_bytes().hex() == (
        "534d54530100" "9c00" "0f050000" "04" "01" "07" "09"
        "c000020a000000000000000000000000" "c00002c8000000000000000000000000"
        "819d" "bb01" "00ffffff" "78563412" "02000000" "03000000" "01000000"
        "a8050000" "efcdab89" "00503412" "00fa0000" "00000400" "00000200" "00563412"
        "3c000000" "0a000000" "05000000" "30750000" "00540100" "00000200" "00000000"
        "2a000000" "28000000" "40000000" "63756269630000000000000000000000"
        "4142" "434445"
    )  # fmt: skip
    assert (VERSION, MAGIC) == (1, b"SMTS")


# -- hostile input ----------------------------------------------------------------------------


def test_wrong_magic() -> None:
    refused(b"XXXX" + VALID[4:], "not a TCP snapshot: magic")
    refused(b"smts" + VALID[4:], "magic")


@pytest.mark.parametrize("version", [0, 2, 0x100, 0xFFFF])
def test_unknown_version(version: int) -> None:
    err = refused(patched(VALID, version=version), f"version {version} is not supported")
    assert isinstance(err, UnsupportedVersion)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("delta", [-HEADER_V1.size, -1, 1, 0xFFFF - HEADER_V1.size])
def test_wrong_header_length(delta: int) -> None:
    data = bytearray(VALID)
    struct.pack_into("<H", data, 6, HEADER_V1.size + delta)
    refused(data, "header length")


def test_truncated_at_every_cut_point() -> None:
    for cut in range(len(VALID)):
        with pytest.raises(SnapshotError, match=r"truncated|magic") as info:
            TcpSnapshot.from_bytes(VALID[:cut])
        assert str(info.value), cut


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 1000])
def test_trailing_bytes(extra: bytes) -> None:
    refused(VALID + extra, "trailing bytes")


@pytest.mark.parametrize("field", ["inq_len", "outq_len"])
def test_huge_queue_claim_is_refused_without_allocating(field: str) -> None:
    data = patched(VALID, **{field: 0xFFFFFFFF})[: HEADER_V1.size + 100]
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        refused(data, "exceeds the limit")
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.05
    assert peak < 64 << 10


def test_max_queue_limit_is_exact() -> None:
    s = snap("ipv4", inq=pattern(10, 1), outq=pattern(11, 2))
    data = s.to_bytes()
    assert TcpSnapshot.from_bytes(data, max_queue=11) == s
    refused(data, "send queue of 11 bytes exceeds the limit of 10", max_queue=10)
    assert DEFAULT_MAX_QUEUE == 64 << 20


def test_unsent_larger_than_send_queue() -> None:
    refused(patched(VALID, unsent_len=71), "unsent length")
    refused(patched(VALID, unsent_len=0xFFFFFFFF), "unsent length")


@pytest.mark.parametrize("family", [0, 2, 5, 10, 255])
def test_bad_family(family: int) -> None:
    refused(patched(VALID, family=family), f"family {family} is neither 4 nor 6")


@pytest.mark.parametrize("which", ["local_addr", "remote_addr"])
@pytest.mark.parametrize("junk_at", [4, 15])
def test_ipv4_address_with_junk_padding(which: str, junk_at: int) -> None:
    raw = bytearray(header_of(VALID)[which])
    raw[junk_at] = 1
    refused(patched(VALID, **{which: bytes(raw)}), "IPv4 address has non-zero padding")


def test_v4mapped_flag_must_agree_with_the_addresses() -> None:
    mapped = snap("v4mapped").to_bytes()
    native = snap("ipv6").to_bytes()
    msg = "disagrees with the v4-mapped flag"
    refused(patched(mapped, flags=header_of(mapped)["flags"] & ~F_V4MAPPED), msg)
    refused(patched(native, flags=header_of(native)["flags"] | F_V4MAPPED), msg)
    # One mapped address, one native: never consistent.
    one_each = patched(mapped, remote_addr=socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    refused(one_each, msg)
    refused(patched(VALID, flags=header_of(VALID)["flags"] | F_V4MAPPED), msg)  # IPv4


@pytest.mark.parametrize("bit", [b for b in range(32) if not (1 << b) & F_ALL])
def test_unknown_flag_bits(bit: int) -> None:
    refused(patched(VALID, flags=header_of(VALID)["flags"] | (1 << bit)), "unknown flag bits")


# ESTABLISHED and the half-closed states are restorable; not the others (no connection, or
# none yet: CLOSE, LISTEN, SYN_SENT, SYN_RECV, NEW_SYN_RECV; TIME_WAIT is held by no socket).
RESTORABLE = {"ESTABLISHED": 1, "FIN_WAIT1": 4, "FIN_WAIT2": 5, "CLOSE_WAIT": 8}
RESTORABLE |= {"LAST_ACK": 9, "CLOSING": 11}


@pytest.mark.parametrize("state", [0, 2, 3, 6, 7, 10, 12, 255])
def test_state_that_cannot_be_restored(state: int) -> None:
    refused(patched(VALID, tcp_state=state), f"state {state} cannot be restored")


@pytest.mark.parametrize("state", RESTORABLE.values(), ids=RESTORABLE.keys())
def test_restorable_states_round_trip(state: int) -> None:
    s = replace(snap("ipv6", inq=pattern(10, 1), outq=pattern(20, 2), unsent=5), tcp_state=state)
    assert TcpSnapshot.from_bytes(s.to_bytes()) == s


@pytest.mark.parametrize("state", RESTORABLE.values(), ids=RESTORABLE.keys())
def test_unsent_fin_only_in_states_with_our_fin(state: int) -> None:
    """F_FIN_UNSENT (our FIN still queued) exists only where we sent a FIN."""
    data = patched(VALID, tcp_state=state, flags=header_of(VALID)["flags"] | F_FIN_UNSENT)
    if state in (RESTORABLE["FIN_WAIT1"], RESTORABLE["FIN_WAIT2"], RESTORABLE["LAST_ACK"],
                 RESTORABLE["CLOSING"]):  # fmt: skip
        assert TcpSnapshot.from_bytes(data).flags & F_FIN_UNSENT
    else:
        refused(data, "unsent FIN in a state without our FIN")


@pytest.mark.parametrize("which", ["local_port", "remote_port"])
def test_port_zero(which: str) -> None:
    refused(patched(VALID, **{which: 0}), "port = 0")


@pytest.mark.parametrize(
    ("which", "other"), [("snd_wscale", "rcv_wscale"), ("rcv_wscale", "snd_wscale")]
)
def test_window_scale(which: str, other: str) -> None:
    refused(patched(VALID, **{which: 15}), f"{which} = 15 is outside 0..14")
    refused(patched(VALID, **{which: 255}), f"{which} = 255")
    no_flag = patched(VALID, flags=header_of(VALID)["flags"] & ~F_WSCALE, **{other: 0})
    refused(no_flag, f"{which} = {header_of(VALID)[which]} is outside 0..0")
    # Without the flag, zero scales are fine.
    assert TcpSnapshot.from_bytes(patched(no_flag, **{which: 0}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("keepidle", 0),
        ("keepidle", 32768),
        ("keepidle", -1),
        ("keepintvl", 0),
        ("keepintvl", 32768),
        ("keepcnt", 0),
        ("keepcnt", 128),
        ("keepcnt", -5),
    ],
)
def test_keepalive_out_of_range(field: str, value: int) -> None:
    refused(patched(VALID, **{field: value}), f"{field} = {value} is outside")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("mss_clamp", 0, "mss_clamp"),
        ("mss_clamp", 65536, "mss_clamp"),
        ("ts_val", 5, None),  # set below without F_TIMESTAMP
        ("user_timeout", 2**31, "user_timeout"),
        ("sndbuf", -1, "sndbuf"),
        ("rcvbuf", -(2**31), "rcvbuf"),
        ("buf_lock", 4, "buf_lock"),
        ("buf_lock", -1, "buf_lock"),
        ("tos", 256, "tos"),
        ("tos", -1, "tos"),
        ("ttl", 0, "ttl"),
        ("ttl", 256, "ttl"),
        ("ttl", -2, "ttl"),
    ],
)
def test_other_fields_out_of_range(field: str, value: int, match: str | None) -> None:
    if field == "ts_val":
        no_ts = patched(VALID, flags=header_of(VALID)["flags"] & ~F_TIMESTAMP)
        refused(no_ts, "timestamp value but timestamps are off")
        assert TcpSnapshot.from_bytes(patched(no_ts, ts_val=0))
        return
    assert match is not None
    refused(patched(VALID, **{field: value}), match)


def test_rcv_wup_after_rcv_seq() -> None:
    h = header_of(VALID)
    refused(patched(VALID, rcv_wup=(h["rcv_seq"] + 1) % 2**32), "rcv_wup lies after rcv_seq")
    # Without TCP_REPAIR_WINDOW data the window fields are not checked against each other.
    no_win = patched(VALID, flags=h["flags"] & ~F_WINDOW, rcv_wup=(h["rcv_seq"] + 1) % 2**32)
    assert TcpSnapshot.from_bytes(no_win)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"a" * 16, "not NUL-terminated"),
        (b"reno\0x" + b"\0" * 10, "not NUL-terminated"),  # junk after the NUL
        (b"Cubic".ljust(16, b"\0"), "bad characters"),
        (b"cu bic".ljust(16, b"\0"), "bad characters"),
        (b"cu\xffbic".ljust(16, b"\0"), "bad characters"),
        (b"reno\n".ljust(16, b"\0"), "bad characters"),
        (b"../x".ljust(16, b"\0"), "bad characters"),
    ],
)
def test_bad_congestion_name(raw: bytes, match: str) -> None:
    refused(patched(VALID, congestion=raw), match)


def test_every_single_bit_flip_of_the_header_is_refused_or_reencodes_exactly() -> None:
    for i in range(HEADER_V1.size * 8):
        data = bytearray(VALID)
        data[i // 8] ^= 1 << (i % 8)
        try:
            s = TcpSnapshot.from_bytes(bytes(data))
        except SnapshotError:
            continue
        assert s.to_bytes() == data, f"bit {i}"


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a bit
            pos = min(pos, len(out) - 1)
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # overwrite a byte, biased to the header
            pos = rng.randrange(min(len(out), HEADER_V1.size + 8))
            out[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:  # insert bytes
            out[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, rng.randrange(1, 300))))
        elif op == 3 and out:  # delete a range
            del out[pos : pos + rng.choice((1, 2, 4, rng.randrange(1, 300)))]
        elif op == 4:  # truncate
            del out[pos:]
        else:  # overwrite a little-endian u32 in the header with an edge value
            pos = rng.randrange(0, HEADER_V1.size - 4)
            val = rng.choice((0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32)))
            out[pos : pos + 4] = val.to_bytes(4, "little")
    return bytes(out)


def test_random_mutations_only_refuse_or_reencode_consistently() -> None:
    pool = [s.to_bytes() for s in ROUND_TRIPS.values() if s.inq_len + s.outq_len < 4096]
    rng = random.Random(0x5E55_0B)
    accepted = 0
    for case in range(4000):
        data = _mutate(rng, rng.choice(pool))
        try:
            s = TcpSnapshot.from_bytes(data)
        except SnapshotError as e:
            assert str(e), f"case {case}: empty message"
            continue
        except Exception as e:  # pragma: no cover - this is the failure being tested for
            pytest.fail(f"case {case}: {type(e).__name__}: {e} for {data.hex()}")
        accepted += 1
        assert s.to_bytes() == data, f"case {case}"
        assert TcpSnapshot.from_bytes(s.to_bytes()) == s, f"case {case}"
    # The mutations must sometimes keep the input valid (queue bytes, free fields) and
    # mostly not: otherwise this test would test nothing.
    assert 100 < accepted < 3000


# -- snapshots built in code (e.g. by a caller) are validated the same way --------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"family": socket.AF_UNIX}, "family"),
        ({"local_addr": "2001:db8::1"}, "is not IPv4"),
        ({"remote_addr": "not an address"}, "remote address"),
        ({"local_port": 65536}, "local port"),
        ({"flags": -1}, "flags"),
        ({"flags": "x"}, "flags"),
        ({"flags": None}, "flags"),
        ({"snd_seq": 2**32}, "snd_seq"),
        ({"mark": -1}, "mark"),
        ({"tcp_state": 2}, "state"),
        ({"user_timeout": -1}, "user_timeout"),
        ({"keepcnt": 5.0}, "keepcnt"),
        ({"congestion": "x" * 16}, "too long"),
        ({"congestion": "cubicé"}, "bad characters"),
        ({"congestion": None}, "congestion"),
        ({"queues": memoryview(b"abc")}, "queue bytes"),
    ],
)
def test_validate_refuses_bad_fields_of_a_built_snapshot(
    change: dict[str, Any], match: str
) -> None:
    bad = replace(snap("ipv4"), **change)
    with pytest.raises(SnapshotError, match=match):
        bad.validate()
    with pytest.raises(SnapshotError, match=match):
        bad.to_bytes()


def test_to_bytes_accepts_queues_up_to_int32_but_decoding_applies_max_queue() -> None:
    s = snap("ipv6", inq=pattern(100, 1))
    with pytest.raises(SnapshotError, match="receive queue length"):
        s.validate(max_queue=99)
    refused(s.to_bytes(), "receive queue of 100 bytes exceeds the limit of 99", max_queue=99)
