"""The exchange document: faithful round trips, and hostile input refused with ExchangeError.

The document arrives from another device, so `decode` must turn every malformed, truncated,
oversized or inconsistent input into an ExchangeError (a ValueError) whose message says what
is wrong — never another exception, a hang, or an allocation sized by what the input claims.
`validate`/`encode` hold a locally built document to the same rules, so ED refuses what ID
would refuse before the freeze window is spent on it.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time
import tracemalloc
from dataclasses import replace
from typing import Any

import msgpack
import pytest

from sessmob import exchange
from sessmob.exchange import (
    MAGIC,
    MAX_UDP_OPTIONS,
    VERSION,
    AppState,
    ExchangeDoc,
    ExchangeError,
    FlowState,
    Limits,
    UdpState,
    UnsupportedExchangeVersion,
    decode,
    encode,
    validate,
)
from sessmob.session import FlowKind
from sessmob.tcp_snapshot import HEADER_V1, TcpSnapshot
from tests.snapshots import established

# -- building documents ----------------------------------------------------------------------


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def snap(v6: bool = False, inq: bytes = b"", outq: bytes = b"", port: int = 40321) -> TcpSnapshot:
    """A valid snapshot of an established connection (tcp_snapshot.py's rules)."""
    family, local, remote = (
        (socket.AF_INET6, "2001:db8::10", "2001:db8:1::200")
        if v6
        else (socket.AF_INET, "192.0.2.10", "192.0.2.200")
    )
    return established(family, (local, port), (remote, 443), inq, outq, len(outq) // 2)


def udp(v6: bool = False, connected: bool = True, queued: int = 2) -> UdpState:
    fam, local, remote, src = (
        (socket.AF_INET6, "2001:db8::10", "2001:db8:1::53", "2001:db8:2::7")
        if v6
        else (socket.AF_INET, "192.0.2.10", "198.51.100.53", "203.0.113.7")
    )
    return UdpState(
        family=fam,
        local=(local, 5353),
        remote=(remote, 53) if connected else None,
        options={"sndbuf": 212992, "rcvbuf": 212992, "tos": 0x28, "ttl": 64, "mark": -1},
        queued=[(src, 1000 + i, pattern(10 * i, i)) for i in range(queued)],
    )


def doc(v6: bool = False, n_tcp: int = 2, n_udp: int = 2, n_apps: int = 1) -> ExchangeDoc:
    flows = [
        FlowState(f"t{i}", "tcp", tcp=snap(v6, pattern(30, i), pattern(40, i + 1), 40000 + i))
        for i in range(n_tcp)
    ]
    flows += [FlowState(f"u{i}", "udp", udp=udp(v6, connected=i % 2 == 0)) for i in range(n_udp)]
    return ExchangeDoc(
        session_id="sess-1.a_B",
        session_type="echo",
        source="tv-box",
        addresses=["2001:db8::10/64", "192.0.2.10/24"] if v6 else ["192.0.2.10/24"],
        apps=[AppState(f"app{i}", pattern(100 + i, i)) for i in range(n_apps)],
        flows=flows,
    )


SMALL = encode(doc(n_tcp=1, n_udp=1))
DEFAULT = Limits()


class Raw(bytes):
    """A ready-made msgpack fragment, spliced in as is by pk()."""


def pk(o: Any) -> bytes:
    """msgpack of `o`, containers built here so that hostile pieces (Raw) can go anywhere."""
    p = msgpack.Packer(use_bin_type=True)
    if isinstance(o, Raw):
        return bytes(o)
    if isinstance(o, dict):
        return p.pack_map_header(len(o)) + b"".join(pk(k) + pk(v) for k, v in o.items())
    if isinstance(o, list | tuple):
        return p.pack_array_header(len(o)) + b"".join(pk(v) for v in o)
    return p.pack(o)


def wire(d: ExchangeDoc) -> dict[str, Any]:
    """The document's body as plain Python (what any msgpack library reads back)."""
    body: dict[str, Any] = msgpack.unpackb(encode(d)[6:], raw=False, use_list=True)
    return body


def doc_bytes(body: dict[str, Any], version: int = VERSION) -> bytes:
    return MAGIC + struct.pack("<H", version) + pk(body)


def refused(data: Any, match: str, limits: Limits = DEFAULT) -> ExchangeError:
    """decode must raise ExchangeError (nothing else) whose message matches — and not the
    catch-all that turns an internal error into an ExchangeError."""
    with pytest.raises(ExchangeError, match=match) as info:
        decode(data, limits)
    assert "internal" not in str(info.value), info.value
    return info.value


def invalid(d: Any, match: str, limits: Limits = DEFAULT) -> None:
    """validate and encode both refuse `d`, with the same message."""
    with pytest.raises(ExchangeError, match=match) as info:
        validate(d, limits)
    assert "internal" not in str(info.value), info.value
    with pytest.raises(ExchangeError, match=match):
        encode(d, limits=limits)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(
    ("n_tcp", "n_udp", "n_apps"), [(2, 2, 1), (1, 0, 0), (0, 1, 3), (0, 0, 0), (0, 0, 16)]
)
def test_round_trip(v6: bool, n_tcp: int, n_udp: int, n_apps: int) -> None:
    original = doc(v6, n_tcp, n_udp, n_apps)
    data = encode(original)
    back = decode(data)
    assert back == original
    assert encode(back) == data
    validate(back)


def test_empty_session() -> None:
    d = ExchangeDoc("s", "t", "d")
    assert decode(encode(d)) == d


def test_decoded_types_are_the_documented_ones() -> None:
    back = decode(encode(doc()))
    assert back.version == VERSION
    assert type(back.apps[0].blob) is bytes
    tcp, udp_flow = back.flows[0], back.flows[2]
    assert tcp.kind == "tcp" and tcp.kind is FlowKind.TCP and tcp.udp is None
    assert udp_flow.kind == "udp" and udp_flow.tcp is None and udp_flow.udp is not None
    u = udp_flow.udp
    assert u.family == socket.AF_INET and type(u.local) is tuple and type(u.remote) is tuple
    assert all(type(q) is tuple and type(q[2]) is bytes for q in u.queued)
    assert back.flows[3].udp is not None and back.flows[3].udp.remote is None


def test_thousand_flows_round_trip() -> None:
    d = doc(True, n_tcp=900, n_udp=100)
    assert decode(encode(d)) == d


def test_decoding_accepts_bytes_bytearray_and_memoryview_slices() -> None:
    data = encode(doc())
    framed = b"HDR!" + data + b"TAIL"
    for form in (data, bytearray(data), memoryview(framed)[4:-4]):
        assert decode(form) == doc()


def test_tcp_queues_are_views_of_the_input_not_copies() -> None:
    buf = bytearray(encode(doc(n_tcp=1, n_udp=0)))
    s = decode(buf).flows[0].tcp
    assert s is not None and s.queues.obj is buf
    before = bytes(s.recv_queue)
    i = buf.rfind(before)  # the app blob starts with the same bytes
    buf[i] ^= 0xFF
    assert bytes(s.recv_queue) != before


def test_body_is_plain_msgpack_with_the_documented_keys() -> None:
    body = wire(doc())
    assert list(body) == ["id", "ty", "src", "ad", "ap", "fl"]
    assert body["ap"][0] == {"ty": "app0", "st": pattern(100, 0)}
    t, u = body["fl"][0], body["fl"][2]
    assert list(t) == ["id", "k", "tcp"] and t["k"] == "tcp"
    assert TcpSnapshot.from_bytes(t["tcp"]) == doc().flows[0].tcp
    assert list(u) == ["id", "k", "udp"] and list(u["udp"]) == ["fam", "l", "r", "o", "q"]
    assert u["udp"]["fam"] == 4 and u["udp"]["l"] == ["192.0.2.10", 5353]
    assert u["udp"]["q"][1] == ["203.0.113.7", 1001, pattern(10, 1)]


def _wide(o: Any) -> bytes:
    """msgpack of `o` with every value in its widest form (str32, bin32, map32, int64...)."""
    if isinstance(o, dict):
        return (
            b"\xdf"
            + struct.pack(">I", len(o))
            + b"".join(_wide(k) + _wide(v) for k, v in o.items())
        )
    if isinstance(o, list):
        return b"\xdd" + struct.pack(">I", len(o)) + b"".join(_wide(v) for v in o)
    if isinstance(o, str):
        return b"\xdb" + struct.pack(">I", len(o)) + o.encode()
    if isinstance(o, bytes):
        return b"\xc6" + struct.pack(">I", len(o)) + o
    if isinstance(o, int):
        return (b"\xcf" + struct.pack(">Q", o)) if o >= 0 else (b"\xd3" + struct.pack(">q", o))
    assert o is None
    return b"\xc0"


def test_any_valid_msgpack_form_is_read() -> None:
    """Another msgpack writer may pick wider forms than ours: the reader takes them all."""
    d = doc(True)
    assert decode(MAGIC + struct.pack("<H", VERSION) + _wide(wire(d))) == d
    assert decode(doc_bytes(wire(d))) == d  # and key order is free:
    body = wire(d)
    assert decode(doc_bytes(dict(reversed(list(body.items()))))) == d


def test_golden_encoding() -> None:
    """Pins the byte format (docs/exchange-format.md): a change here needs a new VERSION."""
    u = UdpState(socket.AF_INET, ("192.0.2.1", 7), None, {"ttl": 64}, [("192.0.2.9", 9, b"x")])
    d = ExchangeDoc(
        "s1",
        "echo",
        "ed",
        ["192.0.2.1/24"],
        [AppState("echo", b"\x01\x02")],
        [FlowState("u0", "udp", udp=u)],
    )
    assert encode(d).hex() == (
        "534d45580100"  # "SMEX", version 1 (u16 LE)
        "86a26964a27331a27479a46563686fa3737263a26564"  # {id: "s1", ty: "echo", src: "ed",
        "a2616491ac3139322e302e322e312f3234"  # ad: ["192.0.2.1/24"],
        "a2617091" "82a27479a46563686fa27374c4020102"  # ap: [{ty: "echo", st: bin 01 02}],
        "a2666c91" "83a26964a27530a16ba3756470a3756470"  # fl: [{id: "u0", k: "udp", udp:
        "85a366616d04a16c92a93139322e302e322e3107a172c0"  # {fam: 4, l: [...], r: nil,
        "a16f81a374746c40a17191" "93a93139322e302e322e3909c40178"  # o: {ttl: 64}, q: [...]}}]}
    )  # fmt: skip


def test_per_flow_overhead_is_under_a_kibibyte() -> None:
    """Issue 4: a document is its queued bytes plus under 1 KiB per flow."""
    d = doc(True, n_tcp=100, n_udp=100, n_apps=0)
    queued = sum(f.tcp.inq_len + f.tcp.outq_len for f in d.flows if f.tcp) + sum(
        len(q[2]) for f in d.flows if f.udp for q in f.udp.queued
    )
    assert (len(encode(d)) - queued) / len(d.flows) < 1024


@pytest.mark.parametrize(("n_tcp", "n_udp"), [(1000, 0), (0, 1000)], ids=["tcp", "udp"])
def test_thousand_flows_decode_fast(n_tcp: int, n_udp: int) -> None:
    """Encoding and decoding sit inside the freeze window (docs/exchange-format.md has the
    numbers). CPU time of this thread, best of 5: other load on the machine does not count."""
    d = doc(False, n_tcp=n_tcp, n_udp=n_udp, n_apps=1)
    data = encode(d)
    best = min(_cpu_time(decode, data) for _ in range(5))
    assert best < 0.050, f"decoding 1000 flows took {best * 1e3:.1f} ms"
    best = min(_cpu_time(encode, d) for _ in range(5))
    assert best < 0.050, f"encoding 1000 flows took {best * 1e3:.1f} ms"


def _cpu_time(fn: Any, arg: Any) -> float:
    t0 = time.thread_time()
    fn(arg)
    return time.thread_time() - t0


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 70000])
def test_bin_headers_are_msgpacks_own(n: int) -> None:
    """The encoder writes bin headers itself (so that blobs are copied once): they must be
    the ones msgpack writes, at every width."""
    d = doc(n_tcp=1, n_udp=1, n_apps=1)
    d.apps[0].blob = bytes(n)
    data = encode(d)
    assert data[6:] == msgpack.packb(wire(d), use_bin_type=True)
    assert decode(data) == d


def test_internal_errors_still_surface_as_exchange_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract holds even against a bug: decode/validate/encode raise ExchangeError only,
    naming the internal error so that it can be found."""

    def boom(*args: Any, **kw: Any) -> Any:
        raise KeyError("boom")

    monkeypatch.setattr(exchange, "_read_app", boom)
    with pytest.raises(ExchangeError, match="internal KeyError: 'boom'") as info:
        decode(SMALL)
    assert isinstance(info.value.__cause__, KeyError)
    monkeypatch.setattr(exchange, "_udp", boom)
    with pytest.raises(ExchangeError, match="internal KeyError: 'boom'"):
        validate(doc())
    monkeypatch.setattr(exchange, "_validate", lambda *a, **kw: None)
    monkeypatch.setattr(exchange, "_to_wire", boom)
    with pytest.raises(ExchangeError, match="cannot be encoded: KeyError: 'boom'"):
        encode(doc())


# -- prefix, size, framing -----------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"SMEx", b"SMTS", b"\x00\x00\x00\x00", b"XEMS"])
def test_wrong_magic(magic: bytes) -> None:
    refused(magic + SMALL[4:], "not an exchange document: magic")


@pytest.mark.parametrize("version", [0, 2, 0x100, 0xFFFF])
def test_unknown_version(version: int) -> None:
    data = SMALL[:4] + struct.pack("<H", version) + SMALL[6:]
    e = refused(data, f"version {version} is not supported")
    assert isinstance(e, UnsupportedExchangeVersion)
    assert f"reads version {VERSION}" in str(e)


def test_unknown_version_is_reported_before_the_size() -> None:
    data = SMALL[:4] + struct.pack("<H", 2) + SMALL[6:]
    with pytest.raises(UnsupportedExchangeVersion):
        decode(data, Limits(max_document=10))


def test_truncated_at_every_prefix() -> None:
    assert decode(SMALL) is not None
    for n in range(len(SMALL)):
        refused(SMALL[:n], "truncated")


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", b"x" * 100, SMALL[6:]])
def test_trailing_bytes(extra: bytes) -> None:
    refused(SMALL + extra, "trailing bytes")


def test_document_size_limit_is_exact() -> None:
    assert decode(SMALL, Limits(max_document=len(SMALL))) is not None
    refused(
        SMALL,
        f"{len(SMALL)} bytes exceed the limit of {len(SMALL) - 1}",
        Limits(max_document=len(SMALL) - 1),
    )
    with pytest.raises(ExchangeError, match="exceed the limit"):
        encode(decode(SMALL), limits=Limits(max_document=len(SMALL) - 1))
    assert encode(decode(SMALL), limits=Limits(max_document=len(SMALL))) == SMALL


@pytest.mark.parametrize("data", ["text", 12, None, [1, 2], memoryview(b"\x00" * 20)[::2]])
def test_not_bytes(data: Any) -> None:
    refused(data, "bytes-like")


def test_top_level_must_be_a_map() -> None:
    refused(MAGIC + b"\x01\x00" + pk([1, 2]), "document must be a map, found array")
    refused(MAGIC + b"\x01\x00" + b"\xc0", "document must be a map, found nil")


# -- limits on counts and sizes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "limits", "count", "match"),
    [
        ("flows", "max_flows", 4, "flows has 4 entries, the limit is 3"),
        ("apps", "max_apps", 3, "apps has 3 entries, the limit is 2"),
        ("addresses", "max_addresses", 2, "addresses has 2 entries, the limit is 1"),
    ],
)
def test_count_limits_are_exact(field: str, limits: str, count: int, match: str) -> None:
    d = doc(True, n_tcp=2, n_udp=2, n_apps=3)
    assert len(getattr(d, field)) >= count
    setattr(d, field, getattr(d, field)[:count])
    data = encode(d)
    assert decode(data, Limits(**{limits: count})) == d
    refused(data, match, Limits(**{limits: count - 1}))
    invalid(d, f"{count} {field} exceed the limit of {count - 1}", Limits(**{limits: count - 1}))


def test_udp_datagram_count_and_byte_limits_are_exact() -> None:
    d = doc(n_tcp=0, n_udp=1)
    u = d.flows[0].udp
    assert u is not None
    u.queued = [("192.0.2.1", 7, b"abcd")] * 5
    data = encode(d)
    assert decode(data, Limits(max_udp_datagrams=5, max_udp_bytes=20)) == d
    refused(data, "queued udp datagrams has 5 entries, the limit is 4", Limits(max_udp_datagrams=4))
    refused(
        data, r"udp queued\[4\] payload takes the queue over 19 bytes", Limits(max_udp_bytes=19)
    )
    invalid(d, "5 queued udp datagrams exceed the limit of 4", Limits(max_udp_datagrams=4))
    invalid(d, "hold 20 bytes, over the limit of 19", Limits(max_udp_bytes=19))


def test_udp_datagram_larger_than_any_udp_payload() -> None:
    d = doc(n_tcp=0, n_udp=1)
    assert d.flows[0].udp is not None
    d.flows[0].udp.queued = [("192.0.2.1", 7, bytes(65536))]
    invalid(d, "payload of 65536 bytes exceeds 65535")
    body = wire(doc(n_tcp=0, n_udp=1))
    body["fl"][0]["udp"]["q"] = [["192.0.2.1", 7, bytes(65536)]]
    refused(doc_bytes(body), r"queued\[0\] payload is a bin of 65536 bytes, the limit is 65535")


def test_app_state_limit_is_exact() -> None:
    d = doc(n_apps=1)
    n = len(d.apps[0].blob)
    assert decode(encode(d), Limits(max_app_state=n)) == d
    refused(
        encode(d), f"blob is a bin of {n} bytes, the limit is {n - 1}", Limits(max_app_state=n - 1)
    )
    invalid(d, f"blob of {n} bytes exceeds the limit of {n - 1}", Limits(max_app_state=n - 1))


def test_tcp_queue_limit_is_exact() -> None:
    d = doc(n_tcp=1, n_udp=0)  # queues of 30 and 40 bytes
    assert decode(encode(d), Limits(max_queue=40)) == d
    refused(encode(d), "send queue of 40 bytes exceeds the limit of 39", Limits(max_queue=39))
    invalid(d, "send queue length = 40 is outside 0..39", Limits(max_queue=39))


def test_udp_option_count_limit() -> None:
    d = doc(n_tcp=0, n_udp=1)
    assert d.flows[0].udp is not None
    d.flows[0].udp.options = {"o" + "_" * i: i for i in range(MAX_UDP_OPTIONS)}
    assert decode(encode(d)) == d
    d.flows[0].udp.options["x"] = 1
    invalid(d, f"{MAX_UDP_OPTIONS + 1} udp options exceed the limit of {MAX_UDP_OPTIONS}")
    body = wire(doc(n_tcp=0, n_udp=1))
    body["fl"][0]["udp"]["o"] = d.flows[0].udp.options
    refused(doc_bytes(body), f"udp options has 33 entries, at most {MAX_UDP_OPTIONS}")


def _udp_body(**changes: Any) -> dict[str, Any]:
    u = {"fam": 4, "l": ["192.0.2.1", 1], "r": None, "o": {}, "q": []}
    return {"fl": [{"id": "f", "k": "udp", "udp": {**u, **changes}}]}


U32 = 2**32 - 1
S32, B32 = Raw(b"\xdb\xff\xff\xff\xff"), Raw(b"\xc6\xff\xff\xff\xff")
A32, M32 = Raw(b"\xdd\xff\xff\xff\xff"), Raw(b"\xdf\xff\xff\xff\xff")
# Headers claiming 4 GiB (or 4 G entries) where each kind of value sits; the input is small.
HUGE = [
    ("str32 session id", {"id": S32}, f"session_id is a str of {U32}"),
    ("bin32 app blob", {"ap": [{"ty": "a", "st": B32}]}, f"blob is a bin of {U32}"),
    ("array32 flows", {"fl": A32}, f"flows has {U32} entries"),
    ("array32 addresses", {"ad": A32}, f"addresses has {U32} entries"),
    ("map32 document", None, f"document has {U32} entries"),
    ("bin32 tcp snapshot", {"fl": [dict(id="f", k="tcp", tcp=B32)]}, f"snapshot is a bin of {U32}"),
    ("array32 udp queue", _udp_body(q=A32), f"queued udp datagrams has {U32}"),
    ("map32 udp options", _udp_body(o=M32), f"udp options has {U32} entries"),
    ("str32 flow id", {"fl": [{"id": Raw(b"\xdb\x7f\xff\xff\xff")}]}, "flow_id is a str of 21474"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "changes", "match"), HUGE, ids=[h[0] for h in HUGE])
def test_huge_claims_are_refused_without_allocating(
    name: str, changes: dict[str, Any] | None, match: str
) -> None:
    if changes is None:
        data = MAGIC + b"\x01\x00" + b"\xdf\xff\xff\xff\xff" + b"\xa2id"
    else:
        body = {"id": "s", "ty": "t", "src": "d", "ad": [], "ap": [], "fl": []}
        body.update(changes)
        data = doc_bytes(body) + bytes(1000)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        refused(data, match)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.05
    assert peak < 64 << 10


def test_a_claim_within_limits_but_beyond_the_input_is_truncation() -> None:
    body = wire(doc(n_tcp=0, n_udp=0))
    body["ap"][0]["st"] = Raw(b"\xc6\x00\x00\x10\x00" + bytes(10))  # 4 KiB declared, 10 there
    refused(
        doc_bytes(body), r"truncated in apps\[0\] blob at byte \d+: 4096 bytes needed, \d+ left"
    )


# -- structure: types, keys ----------------------------------------------------------------


def _at(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        body = body[p]
    body[path[-1]] = value


# (path into the body of doc(n_tcp=1, n_udp=2), replacement, expected message)
WRONG_TYPES = [
    (("id",), 5, "session_id must be a str, found int"),
    (("ty",), b"echo", "session_type must be a str, found bin"),
    (("src",), None, "source must be a str, found nil"),
    (("ad",), "192.0.2.1/24", "addresses must be an array, found str"),
    (("ad", 0), 3232235777, "address must be a str, found int"),
    (("ap",), {}, "apps must be an array, found map"),
    (("ap", 0), ["x", b""], r"apps\[0\] must be a map, found array"),
    (("ap", 0, "st"), "text", r"apps\[0\] blob must be a bin, found str"),
    (("ap", 0, "ty"), True, r"apps\[0\] app_type must be a str, found bool"),
    (("fl",), None, "flows must be an array, found nil"),
    (("fl", 0), "t0", r"flows\[0\] None: flow must be a map, found str"),
    (("fl", 0, "id"), 7, "flow_id must be a str, found int"),
    (("fl", 0, "k"), 6, "kind must be a str, found int"),
    (("fl", 0, "tcp"), [1], "tcp snapshot must be a bin, found array"),
    (("fl", 1, "udp"), b"", "udp must be a map, found bin"),
    (("fl", 1, "udp", "fam"), "inet", "udp family must be an int, found str"),
    (("fl", 1, "udp", "fam"), 4.0, "udp family must be an int, found float"),
    (("fl", 1, "udp", "l"), "192.0.2.10:5353", "udp local must be an array, found str"),
    (("fl", 1, "udp", "l"), ["192.0.2.10"], "udp local must be an array of 2"),
    (("fl", 1, "udp", "l", 1), "5353", "udp local port must be an int, found str"),
    (("fl", 1, "udp", "r"), 0, "udp remote must be an array, found int"),
    (("fl", 1, "udp", "o"), [], "udp options must be a map, found array"),
    (("fl", 1, "udp", "o", "ttl"), "64", "udp option ttl must be an int, found str"),
    (("fl", 1, "udp", "q"), {}, "queued udp datagrams must be an array, found map"),
    (("fl", 1, "udp", "q", 0), ["a", 1], r"queued\[0\] datagram must be an array of 3"),
    (("fl", 1, "udp", "q", 0, 2), "payload", r"queued\[0\] payload must be a bin, found str"),
    (("fl", 1, "udp", "q", 0, 1), None, r"queued\[0\] source port must be an int, found nil"),
    (("fl", 1, "udp", "q", 0, 1), Raw(b"\xc7\x01\x00x"), r"port must be an int, found ext"),
    (("fl", 1, "udp", "q", 0, 1), Raw(b"\xc1"), r"found reserved byte 0xc1"),
    (("fl", 1, "udp", "q", 0, 0), "203.0.113.\xe9", r"source address at byte \d+ is not ASCII"),
    (("id",), Raw(b"\xa2\xff\xfe"), r"session_id at byte \d+ is not ASCII"),
]


@pytest.mark.parametrize(
    ("path", "value", "match"), WRONG_TYPES, ids=[m for _, _, m in WRONG_TYPES]
)
def test_wrong_types(path: tuple[Any, ...], value: Any, match: str) -> None:
    body = wire(doc(n_tcp=1, n_udp=2))
    _at(body, path, value)
    refused(doc_bytes(body), match)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ((), "document has unknown key 'x'"),
        (("ap", 0), "apps\\[0\\] has unknown key 'x'"),
        (("fl", 0), "flow has unknown key 'x'"),
        (("fl", 1, "udp"), "udp has unknown key 'x'"),
    ],
)
def test_unknown_keys(path: tuple[Any, ...], match: str) -> None:
    body = wire(doc(n_tcp=1, n_udp=1))
    target = body
    for p in path:
        target = target[p]
    target["x"] = target.pop(next(iter(target)))  # same size: the key itself is refused
    refused(doc_bytes(body), match)


@pytest.mark.parametrize(
    ("path", "key", "match"),
    [
        ((), "fl", "document lacks 'fl'"),
        ((), "id", "document lacks 'id'"),
        (("ap", 0), "st", r"apps\[0\] lacks 'st'"),
        (("fl", 0), "k", "flow lacks 'k'"),
        (("fl", 1, "udp"), "r", "udp lacks 'r'"),
    ],
)
def test_missing_keys(path: tuple[Any, ...], key: str, match: str) -> None:
    body = wire(doc(n_tcp=1, n_udp=1))
    target = body
    for p in path:
        target = target[p]
    del target[key]
    refused(doc_bytes(body), match)


def test_repeated_keys() -> None:
    body = SMALL[6:]
    assert body[0] == 0x86
    dup = b"\x87" + body[1:] + pk("id") + pk("again")
    refused(MAGIC + b"\x01\x00" + dup, "document has 7 entries, at most 6")
    # six entries, one of them twice
    fields = wire(decode(SMALL))
    fields.pop("src")
    raw = pk(fields)
    raw = b"\x86" + raw[1:] + pk("ty") + pk("again")
    refused(MAGIC + b"\x01\x00" + raw, "document repeats key 'ty'")
    opts = Raw(b"\x82" + pk("ttl") + pk(1) + pk("ttl") + pk(2))
    body2 = wire(doc(n_tcp=0, n_udp=1))
    body2["fl"][0]["udp"]["o"] = opts
    refused(doc_bytes(body2), "udp option 'ttl' is repeated")


# -- field rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_id", ""),
        ("session_id", "a" * 65),
        ("session_id", "a b"),
        ("session_id", "a/b"),
        ("session_id", "a\n"),
        ("session_id", "."),
        ("session_id", ".."),
        ("session_type", "Echo"),
        ("session_type", "a" * 65),
        ("source", "dev:1"),
        ("source", ""),
    ],
)
def test_bad_ids(field: str, value: str) -> None:
    d = doc()
    setattr(d, field, value)
    bad = f"{field} {re.escape(repr(value))} (does not match|is not a usable name)"
    invalid(d, bad)
    body = wire(doc())
    body[{"session_id": "id", "session_type": "ty", "source": "src"}[field]] = value
    # the reader refuses an overlong string by its header, before reading it
    refused(doc_bytes(body), f"({bad}|{field} is a str of 65 bytes)")


def test_longest_ids_are_accepted() -> None:
    d = doc()
    d.session_id, d.session_type, d.source = "A" * 64, "z" * 64, "-" * 64
    d.flows[0].flow_id = "F" * 32
    d.apps[0].app_type = "." * 64
    assert decode(encode(d)) == d


@pytest.mark.parametrize("value", ["", "f" * 33, "f 1", "f/1", "..", "ü"])
def test_bad_flow_ids(value: str) -> None:
    d = doc()
    d.flows[1].flow_id = value
    invalid(d, rf"flows\[1\] {value!r}: flow_id")
    body = wire(doc())
    body["fl"][1]["id"] = value
    match = "not ASCII" if value == "ü" else rf"flows\[1\] {value!r}: flow_id"
    refused(doc_bytes(body), match)


def test_bad_app_type() -> None:
    d = doc()
    d.apps[0].app_type = "App"
    invalid(d, r"apps\[0\] app_type 'App'")
    body = wire(doc())
    body["ap"][0]["ty"] = "App"
    refused(doc_bytes(body), r"apps\[0\] app_type 'App'")


def test_duplicate_flow_ids() -> None:
    d = doc()
    d.flows[3].flow_id = d.flows[0].flow_id
    invalid(d, r"flows\[3\] 't0': flow_id 't0' is not unique")
    body = wire(doc())
    body["fl"][3]["id"] = "t0"
    refused(doc_bytes(body), r"flows\[3\] 't0': flow_id 't0' is not unique")


@pytest.mark.parametrize(
    "value",
    [
        "192.0.2.1",
        "192.0.2.1/33",
        "192.0.2.1/-1",
        "192.0.2.1/+8",
        "192.0.2.1/ 8",
        "192.0.2.1/0x8",
        "192.0.2.1/8/8",
        "192.0.2.1/",
        "2001:db8::1/129",
        "2001:db8::1%eth0/64",
        "300.0.2.1/24",
        "2001:db8::g/64",
        "/24",
        "",
        "192.0.2.1/1000",
    ],
)
def test_bad_session_addresses(value: str) -> None:
    d = doc()
    d.addresses = [value]
    invalid(d, r"addresses\[0\]")
    body = wire(doc())
    body["ad"] = [value]
    refused(doc_bytes(body), r"addresses\[0\]")


def test_address_edges_accepted() -> None:
    d = doc()
    d.addresses = ["0.0.0.0/0", "192.0.2.1/32", "::/0", "2001:db8::1/128", "::ffff:192.0.2.9/96"]
    assert decode(encode(d)) == d


def test_duplicate_session_address_even_spelled_differently() -> None:
    d = doc()
    d.addresses = ["2001:db8::1/64", "2001:DB8:0::1/48"]
    invalid(d, r"addresses\[1\] '2001:DB8:0::1/48' repeats addresses\[0\]")
    body = wire(doc())
    body["ad"] = d.addresses
    refused(doc_bytes(body), r"repeats addresses\[0\]")


UDP_BAD = [
    (("l", 1), 0, "udp local port = 0 is outside 1..65535"),
    (("l", 1), 65536, "udp local port = 65536 is outside 1..65535"),
    (("l", 1), -1, "udp local port = -1 is outside 1..65535"),
    (("l", 0), "2001:db8::1", "udp local address '2001:db8::1' is not an IPv4 address"),
    (("l", 0), "localhost", "udp local address 'localhost' is not an IPv4 address"),
    (("r", 1), 0, "udp remote port = 0 is outside 1..65535"),
    (("r", 0), "1.2.3", "udp remote address '1.2.3' is not an IPv4 address"),
    (("q", 0, 1), 65536, r"udp queued\[0\] source port = 65536 is outside 0..65535"),
    (("q", 0, 1), -5, r"udp queued\[0\] source port = -5 is outside 0..65535"),
    (("q", 0, 0), "::1", r"udp queued\[0\] source address '::1' is not an IPv4 address"),
    (("o", "ttl"), 2**31, "udp option ttl = 2147483648 is outside"),
    (("o", "ttl"), -(2**31) - 1, "udp option ttl = -2147483649 is outside"),
]


@pytest.mark.parametrize(("path", "value", "match"), UDP_BAD, ids=[m for _, _, m in UDP_BAD])
def test_bad_udp_fields(path: tuple[Any, ...], value: Any, match: str) -> None:
    body = wire(doc(n_tcp=0, n_udp=1))  # u0 is connected and has queued datagrams
    _at(body["fl"][0]["udp"], path, value)
    refused(doc_bytes(body), rf"flows\[0\] 'u0': {match}")
    d = doc(n_tcp=0, n_udp=1)
    u = d.flows[0].udp
    assert u is not None
    if path[0] == "o":
        u.options[path[1]] = value
    elif path[0] == "q":
        q: list[Any] = list(u.queued[0])
        q[path[2]] = value
        u.queued[0] = (q[0], q[1], q[2])
    else:
        ep = list(getattr(u, {"l": "local", "r": "remote"}[path[0]]))
        ep[path[1]] = value
        setattr(u, {"l": "local", "r": "remote"}[path[0]], (ep[0], ep[1]))
    invalid(d, rf"flows\[0\] 'u0': {match}")


def test_unconnected_udp_needs_a_local_port_too() -> None:
    d = doc(n_tcp=0, n_udp=1)
    assert d.flows[0].udp is not None
    d.flows[0].udp.remote = None
    d.flows[0].udp.local = ("0.0.0.0", 0)
    invalid(d, "udp local port = 0 is outside 1..65535")


def test_udp_source_port_zero_is_accepted() -> None:
    """A datagram from port 0 is legal; refusing it would let any sender block a move."""
    d = doc(n_tcp=0, n_udp=1)
    assert d.flows[0].udp is not None
    d.flows[0].udp.queued = [("198.51.100.1", 0, b"x")]
    assert decode(encode(d)) == d


@pytest.mark.parametrize("fam", [0, 5, 10, 2, -4, 2**40])
def test_bad_udp_wire_family(fam: int) -> None:
    body = wire(doc(n_tcp=0, n_udp=1))
    body["fl"][0]["udp"]["fam"] = fam
    refused(doc_bytes(body), f"udp family {fam} is neither 4 nor 6")


@pytest.mark.parametrize("name", ["SNDBUF", "a" * 33, "so-mark", "", "ttl1"])
def test_bad_udp_option_names(name: str) -> None:
    d = doc(n_tcp=0, n_udp=1)
    assert d.flows[0].udp is not None
    d.flows[0].udp.options = {name: 1}
    invalid(d, "udp option name")
    body = wire(doc(n_tcp=0, n_udp=1))
    body["fl"][0]["udp"]["o"] = {name: 1}
    refused(doc_bytes(body), "udp option name")


@pytest.mark.parametrize(
    ("kind", "state", "match"),
    [
        ("tcp", {"udp"}, "kind 'tcp' but carries udp state"),
        ("udp", {"tcp"}, "kind 'udp' but carries tcp state"),
        ("tcp", {"tcp", "udp"}, "kind 'tcp' but carries tcp and udp state"),
        ("udp", set(), "kind 'udp' but carries no state"),
        ("sctp", {"tcp"}, "kind 'sctp' is neither 'tcp' nor 'udp'"),
        ("TCP", {"tcp"}, "kind 'TCP' is neither 'tcp' nor 'udp'"),
    ],
)
def test_kind_must_match_the_state(kind: str, state: set[str], match: str) -> None:
    body = wire(doc(n_tcp=1, n_udp=1))
    tcp_state, udp_state = body["fl"][0]["tcp"], body["fl"][1]["udp"]
    f: dict[str, Any] = {"id": "f", "k": kind}
    if "tcp" in state:
        f["tcp"] = tcp_state
    if "udp" in state:
        f["udp"] = udp_state
    body["fl"] = [f]
    refused(doc_bytes(body), rf"flows\[0\] 'f': {match}")


def test_kind_mismatch_in_a_local_document() -> None:
    d = doc(n_tcp=1, n_udp=1)
    t, u = d.flows
    invalid(replace(d, flows=[replace(t, kind="udp")]), "kind 'udp' but tcp state is present")
    invalid(replace(d, flows=[replace(u, kind="tcp")]), "kind 'tcp' but udp state is present")
    invalid(
        replace(d, flows=[replace(t, tcp=None)]), "kind 'tcp' needs a TcpSnapshot, not NoneType"
    )
    invalid(replace(d, flows=[replace(u, udp=None)]), "kind 'udp' needs a UdpState, not None")
    invalid(replace(d, flows=[replace(t, kind="quic")]), "kind 'quic' is neither")
    invalid(replace(d, flows=[replace(t, tcp=b"snapshot")]), "needs a TcpSnapshot, not bytes")  # type: ignore[arg-type]
    invalid(replace(d, flows=[replace(u, udp="udp")]), "must be a UdpState, not str")  # type: ignore[arg-type]
    validate(replace(d, flows=[replace(t, kind=FlowKind.TCP)]))


# -- the embedded TCP snapshot -------------------------------------------------------------


def _with_tcp(raw: bytes) -> bytes:
    body = wire(doc(n_tcp=1, n_udp=0))
    body["fl"][0]["tcp"] = raw
    return doc_bytes(body)


def test_corrupt_tcp_snapshots() -> None:
    good = bytes(wire(doc(n_tcp=1, n_udp=0))["fl"][0]["tcp"])
    assert decode(_with_tcp(good)) == doc(n_tcp=1, n_udp=0)
    refused(_with_tcp(b"XXXX" + good[4:]), r"flows\[0\] 't0': not a TCP snapshot: magic")
    refused(_with_tcp(good[:-1]), "TCP snapshot truncated")
    refused(_with_tcp(good + b"\x00"), "TCP snapshot has trailing bytes")
    refused(_with_tcp(good[:4] + b"\x02\x00" + good[6:]), "TCP snapshot version 2 is not supported")
    refused(_with_tcp(b""), "TCP snapshot truncated: 0 bytes")
    fields = list(HEADER_V1.unpack_from(good))
    fields[5] = 7  # tcp state CLOSE: cannot be restored
    refused(
        _with_tcp(HEADER_V1.pack(*fields) + good[HEADER_V1.size :]), "state 7 cannot be restored"
    )
    fields = list(HEADER_V1.unpack_from(good))
    fields[10] = 0  # local port
    refused(_with_tcp(HEADER_V1.pack(*fields) + good[HEADER_V1.size :]), "local port = 0")


def test_invalid_snapshot_in_a_local_document() -> None:
    d = doc(n_tcp=1, n_udp=0)
    assert d.flows[0].tcp is not None
    d.flows[0].tcp = replace(d.flows[0].tcp, local_port=0)
    invalid(d, r"flows\[0\] 't0': TCP snapshot local port = 0 is outside 1..65535")


# -- local documents: types that only Python can get wrong ---------------------------------


def test_local_document_shapes() -> None:
    invalid("doc", "must be an ExchangeDoc, not str")
    invalid(replace(doc(), addresses=("192.0.2.1/24",)), "addresses must be a list, not tuple")  # type: ignore[arg-type]
    invalid(replace(doc(), flows=None), "flows must be a list, not NoneType")  # type: ignore[arg-type]
    invalid(replace(doc(), apps=["x"]), r"apps\[0\] must be an AppState, not str")  # type: ignore[list-item]
    invalid(replace(doc(), apps=[AppState("a", "text")]), r"apps\[0\] blob must be bytes, not str")  # type: ignore[arg-type]
    invalid(replace(doc(), flows=[object()]), r"flows\[0\] None: must be a FlowState, not object")  # type: ignore[list-item]
    invalid(replace(doc(), session_id=5), "session_id 5 does not match")  # type: ignore[arg-type]
    invalid(replace(doc(), version="1"), "version '1' is not an int")  # type: ignore[arg-type]
    d = doc(n_tcp=0, n_udp=1)
    u = d.flows[0].udp
    assert u is not None
    u.local = ("2001:db8::10", 5353, 0, 0)  # type: ignore[assignment]
    u.family = socket.AF_INET6
    u.remote, u.queued = None, []
    invalid(d, r"udp local must be \(address, port\), not a 4-tuple \(getsockname\(\)\[:2\]")
    u.local = ["2001:db8::10", 5353]  # type: ignore[assignment]
    invalid(d, r"udp local must be \(address, port\), not list")
    u.local = ("2001:db8::10", True)
    invalid(d, "udp local port = True is outside")
    u.local = ("2001:db8::10", 5353)
    u.family = socket.AF_UNIX
    invalid(d, "udp family .* is neither AF_INET nor AF_INET6")
    u.family = socket.AF_INET6
    u.queued = [("2001:db8::1", 1)]  # type: ignore[list-item]
    invalid(d, r"queued\[0\] must be \(source address, source port, payload\)")
    u.queued = [("2001:db8::1", 1, "text")]  # type: ignore[list-item]
    invalid(d, r"queued\[0\] payload must be bytes, not str")
    u.queued = [("2001:db8::1", 1, bytearray(b"x")), ("2001:db8::1", 2, memoryview(b"yz"))]  # type: ignore[list-item]
    validate(d)  # any bytes-like payload is fine
    back = decode(encode(d)).flows[0].udp
    assert back is not None
    assert back.queued == [("2001:db8::1", 1, b"x"), ("2001:db8::1", 2, b"yz")]
    u.options = {"ttl": 1.5}  # type: ignore[dict-item]
    invalid(d, "udp option ttl = 1.5 is outside")
    u.options = [("ttl", 1)]  # type: ignore[assignment]
    invalid(d, "udp options must be a dict, not list")


def test_local_document_of_another_version() -> None:
    with pytest.raises(
        UnsupportedExchangeVersion, match=r"version 2 is not supported .*writes version 1"
    ):
        encode(replace(doc(), version=2))


def test_limits_must_be_non_negative_ints() -> None:
    with pytest.raises(ValueError, match=r"Limits\.max_flows must be a non-negative int"):
        Limits(max_flows=-1)
    with pytest.raises(ValueError, match=r"Limits\.max_document"):
        Limits(max_document=1.5)  # type: ignore[arg-type]


# -- fuzz ----------------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:  # flip a bit
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # replace a byte with an interesting one
            b[i] = rng.choice(
                [
                    0x00,
                    0x7F,
                    0x80,
                    0x8F,
                    0x90,
                    0x9F,
                    0xA0,
                    0xBF,
                    0xC0,
                    0xC1,
                    0xC2,
                    0xC4,
                    0xC6,
                    0xC7,
                    0xCA,
                    0xCC,
                    0xCF,
                    0xD0,
                    0xD3,
                    0xD9,
                    0xDB,
                    0xDC,
                    0xDD,
                    0xDE,
                    0xDF,
                    0xE0,
                    0xFF,
                ]
            )
        elif op == 2:  # insert bytes
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:  # delete a run
            del b[i : i + rng.randint(1, 8)]
        elif op == 4:  # truncate
            del b[rng.randrange(len(b) + 1) :]
        elif op == 5 and len(b) > 4:  # 32-bit field set to a large or boundary value
            b[i : i + 4] = struct.pack(">I", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 65535]))
        elif op == 6 and len(b) > 8:  # splice a piece of the document elsewhere
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randint(1, 32)]
    return bytes(b)


def test_random_mutations_only_ever_raise_exchange_error() -> None:
    rng = random.Random(0x5E55)
    seeds = [
        SMALL,
        encode(doc(True, n_tcp=1, n_udp=2, n_apps=2)),
        encode(ExchangeDoc("s", "t", "d")),
    ]
    accepted = refusals = 0
    for n in range(4000):
        data = _mutate(rng, seeds[n % len(seeds)])
        limits = Limits(max_queue=256, max_udp_bytes=512) if n % 5 == 0 else Limits()
        try:
            d = decode(data, limits)
        except ExchangeError as e:
            assert "internal" not in str(e), (data.hex(), e)
            refusals += 1
            continue
        # whatever is accepted is a valid document that survives its own round trip, and
        # msgpack itself reads the same content from it
        validate(d, limits)
        again = encode(d, limits=limits)
        assert decode(again, limits) == d
        assert msgpack.unpackb(data[6:]) == msgpack.unpackb(again[6:])
        accepted += 1
    assert refusals > 3000 and accepted > 0, (refusals, accepted)


def test_module_keeps_its_public_names() -> None:
    """Other parts of sessmob are written against these; keep them."""
    assert exchange.VERSION == 1 and issubclass(ExchangeError, ValueError)
    assert issubclass(UnsupportedExchangeVersion, ExchangeError)
    assert Limits() == Limits(256 << 20, 4096, 16, 64 << 20, 64 << 20, 4096, 16 << 20, 16)
