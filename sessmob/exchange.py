"""The exchange document: one migrating service session, as it crosses from ED to ID.

Hierarchy (paper, Fig. 3): service session -> application sessions (each with its state part,
an opaque blob) -> communication flows (TCP snapshot or UDP state) plus network state (the
session's own addresses). docs/exchange-format.md describes the encoding field by field.

Byte form: the prefix ``b"SMEX"`` + u16 version (little-endian), then exactly one msgpack map.
The document comes from another device, so decoding trusts nothing: every container count,
string and binary length is compared with the configured Limits *before* the bytes behind it
are touched, every field is validated, and the only exception that leaves `decode` is
ExchangeError. Decoding reads the msgpack subset of this format itself rather than through
msgpack.Unpacker: the Unpacker's limits do not cover read_array_header or skip, a leaf
position would build whatever nested structure it is given before its type can be checked,
and feed() copies the input, whereas TCP queues here stay views of the input. Encoding writes
the same msgpack (msgpack.Packer for the small values, bulky bins placed as they are and joined
once), so any msgpack library reads the body.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import msgpack

from sessmob.session import FlowKind
from sessmob.tcp_snapshot import HEADER_V1, SnapshotError, TcpSnapshot

__all__ = [
    "MAGIC",
    "MAX_UDP_OPTIONS",
    "VERSION",
    "AppState",
    "ExchangeDoc",
    "ExchangeError",
    "FlowState",
    "Limits",
    "UdpState",
    "UnsupportedExchangeVersion",
    "decode",
    "encode",
    "validate",
]

MAGIC = b"SMEX"
VERSION = 1
PREFIX = struct.Struct("<4sH")  # magic, version
MAX_UDP_OPTIONS = 32  # socket options carried per UDP flow; a handful are used
MAX_DATAGRAM = 65535  # no UDP payload is larger (jumbograms are not carried)


class ExchangeError(ValueError):
    """An exchange document is malformed, truncated, oversized or inconsistent."""


class UnsupportedExchangeVersion(ExchangeError):
    """The document is of a version this sessmob does not read (or write)."""


@dataclass(frozen=True)
class Limits:
    """What a device accepts; decoding refuses anything larger before allocating for it."""

    max_document: int = 256 << 20  # bytes, prefix included
    max_flows: int = 4096
    max_apps: int = 16
    max_app_state: int = 64 << 20  # bytes of one application's blob
    max_queue: int = 64 << 20  # per TCP queue (passed to TcpSnapshot.from_bytes)
    max_udp_datagrams: int = 4096  # queued datagrams of one flow
    max_udp_bytes: int = 16 << 20  # all queued datagrams of one flow
    max_addresses: int = 16

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v < 0:
                raise ValueError(f"Limits.{f.name} must be a non-negative int, not {v!r}")


@dataclass
class UdpState:
    """A bound (and maybe connected) UDP socket. UDP has no repair mode, so the datagrams
    still queued at GetState are drained and travel here to the importing application."""

    family: int  # socket.AF_INET / AF_INET6
    local: tuple[str, int]
    remote: tuple[str, int] | None  # None: unconnected
    options: dict[str, int]  # {"sndbuf":..., "rcvbuf":..., "tos":..., ...}; names [a-z_]{1,32}
    queued: list[tuple[str, int, bytes]]  # (source addr, source port, payload)


@dataclass
class FlowState:
    """One communication flow; exactly one of tcp/udp, matching kind."""

    flow_id: str  # [A-Za-z0-9_.-]{1,32}, unique in the document
    kind: str  # "tcp" | "udp"
    tcp: TcpSnapshot | None = None
    udp: UdpState | None = None


@dataclass
class AppState:
    """One application session's state part, opaque to the RM."""

    app_type: str  # [a-z0-9_.-]{1,64}
    blob: bytes


@dataclass
class ExchangeDoc:
    """The service session: what GetState fills on ED and SetState reads on ID."""

    session_id: str  # [A-Za-z0-9_.-]{1,64}
    session_type: str  # [a-z0-9_.-]{1,64}
    source: str  # exporting device's name [A-Za-z0-9_.-]{1,64}
    addresses: list[str] = field(default_factory=list)  # "addr/prefixlen", IPv4 or IPv6
    apps: list[AppState] = field(default_factory=list)
    flows: list[FlowState] = field(default_factory=list)
    version: int = VERSION


_DEFAULT_LIMITS = Limits()
_PREFIX_V1 = PREFIX.pack(MAGIC, VERSION)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FLOW_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_TYPE = re.compile(r"[a-z0-9_.-]{1,64}")
_OPTION = re.compile(r"[a-z_]{1,32}")
_PREFIXLEN = re.compile(r"[0-9]{1,3}")
_INT32 = (-(2**31), 2**31 - 1)
_WIRE_FAMILY: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}
_HOST_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_KINDS = {"tcp": FlowKind.TCP, "udp": FlowKind.UDP}


# -- public API ----------------------------------------------------------------------------


def encode(doc: ExchangeDoc, *, limits: Limits = _DEFAULT_LIMITS, validate: bool = True) -> bytes:
    """Validate `doc` against `limits` and return its byte form (raises ExchangeError).

    Validating on ED means a document the peer (with the same limits) would refuse is
    refused here rather than sent. `validate=False` skips the semantic checks (not the size
    limits) for a document whose parts were checked already: the RM's export inside the
    freeze window, whose names and addresses it validated before the freeze and whose
    snapshots come from its own dump — the importing side validates everything anyway.
    """
    try:
        if validate:
            _validate(doc, limits, snapshots=False)  # to_bytes() validates undumped snapshots
        data = b"".join(_to_wire(doc, limits))
    except ExchangeError as e:
        raise type(e)(f"exchange document: {e}") from None
    except Exception as e:  # msgpack errors, TypeError, OverflowError, ...
        raise ExchangeError(f"exchange document cannot be encoded: {type(e).__name__}: {e}") from e
    if len(data) > limits.max_document:
        raise ExchangeError(
            f"exchange document: {len(data)} bytes exceed the limit of {limits.max_document}"
        )
    return data


def decode(data: bytes | bytearray | memoryview, limits: Limits = _DEFAULT_LIMITS) -> ExchangeDoc:
    """Parse and validate a document; raises ExchangeError and nothing else.

    TCP snapshot queues are views of `data` (no copy): keep `data` alive and unchanged until
    the snapshots are restored (a bytearray cannot be resized while views exist).
    """
    try:
        return _decode(data, limits)
    except ExchangeError as e:
        raise type(e)(f"exchange document: {e}") from None
    except Exception as e:  # a bug, not a verdict on the input: say so, but keep the contract
        raise ExchangeError(
            f"exchange document could not be decoded (internal {type(e).__name__}: {e})"
        ) from e


def validate(doc: ExchangeDoc, limits: Limits = _DEFAULT_LIMITS) -> None:
    """Raise ExchangeError unless every field of `doc` is well-formed and within `limits`."""
    try:
        _validate(doc, limits, snapshots=True)
    except ExchangeError as e:
        raise type(e)(f"exchange document: {e}") from None
    except Exception as e:
        raise ExchangeError(
            f"exchange document could not be validated (internal {type(e).__name__}: {e})"
        ) from e


# -- semantic checks (shared by validate, encode and decode) -------------------------------


def _fail(msg: str) -> NoReturn:
    raise ExchangeError(msg)


def _name(value: object, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        _fail(f"{what} {value!r} does not match {pattern.pattern}")
    if value in (".", ".."):  # ids may end up in paths under a state directory
        _fail(f"{what} {value!r} is not a usable name")


def _int(value: object, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        _fail(f"{what} = {value!r} is outside {lo}..{hi}")
    return value


def _list(value: object, limit: int, what: str) -> list[Any]:
    if type(value) is not list:
        _fail(f"{what} must be a list, not {type(value).__name__}")
    if len(value) > limit:
        _fail(f"{len(value)} {what} exceed the limit of {limit}")
    return value


def _ip(family: int, addr: object, what: str) -> bytes:
    try:
        return socket.inet_pton(family, addr)  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError):
        v = 4 if family == socket.AF_INET else 6
        _fail(f"{what} {addr!r} is not an IPv{v} address")


def _session_address(value: object, what: str) -> bytes:
    """Check "addr/prefixlen"; return the packed address (duplicates are found by it)."""
    if not isinstance(value, str) or value.count("/") != 1:
        _fail(f"{what} {value!r} is not 'address/prefixlen'")
    addr, plen = value.split("/")
    family, bits = (socket.AF_INET6, 128) if ":" in addr else (socket.AF_INET, 32)
    packed = _ip(family, addr, what)
    if _PREFIXLEN.fullmatch(plen) is None or int(plen) > bits:
        _fail(f"{what} {value!r}: prefix length {plen!r} is outside 0..{bits}")
    return packed


def _bytes_len(value: object, what: str) -> int:
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes
    _fail(f"{what} must be bytes, not {type(value).__name__}")


def _endpoint(family: int, ep: object, port_lo: int, what: str) -> None:
    if type(ep) is not tuple or len(ep) != 2:
        n = f"a {len(ep)}-tuple" if type(ep) is tuple else type(ep).__name__
        _fail(f"{what} must be (address, port), not {n} (getsockname()[:2] for IPv6)")
    addr, port = ep
    try:
        socket.inet_pton(family, addr)
    except (OSError, TypeError, ValueError):
        _ip(family, addr, f"{what} address")  # raises, with the message
    if type(port) is not int or not port_lo <= port <= 65535:
        _fail(f"{what} port = {port!r} is outside {port_lo}..65535")


def _udp(u: object, limits: Limits) -> None:
    if not isinstance(u, UdpState):
        _fail(f"udp state must be a UdpState, not {type(u).__name__}")
    if not isinstance(u.family, int) or u.family not in _WIRE_FAMILY:
        _fail(f"udp family {u.family!r} is neither AF_INET nor AF_INET6")
    _endpoint(u.family, u.local, 1, "udp local")
    if u.remote is not None:
        _endpoint(u.family, u.remote, 1, "udp remote")
    if type(u.options) is not dict:
        _fail(f"udp options must be a dict, not {type(u.options).__name__}")
    if len(u.options) > MAX_UDP_OPTIONS:
        _fail(f"{len(u.options)} udp options exceed the limit of {MAX_UDP_OPTIONS}")
    lo, hi = _INT32
    for name, value in u.options.items():
        if not (type(name) is str and _OPTION.fullmatch(name)):
            _name(name, _OPTION, "udp option name")  # raises, with the message
        if type(value) is not int or not lo <= value <= hi:
            _fail(f"udp option {name} = {value!r} is outside {lo}..{hi}")
    queued = _list(u.queued, limits.max_udp_datagrams, "queued udp datagrams")
    total = 0
    i = 0
    try:
        for dg in queued:
            if type(dg) is not tuple or len(dg) != 3:
                _fail("must be (source address, source port, payload)")
            # Source port 0 is legal on the wire: refusing it would let any sender block a move.
            _endpoint(u.family, dg[:2], 0, "source")
            n = _bytes_len(dg[2], "payload")
            if n > MAX_DATAGRAM:
                _fail(f"payload of {n} bytes exceeds {MAX_DATAGRAM}")
            total += n
            i += 1
    except ExchangeError as e:
        raise ExchangeError(f"udp queued[{i}] {e}") from None
    if total > limits.max_udp_bytes:
        _fail(f"queued udp datagrams hold {total} bytes, over the limit of {limits.max_udp_bytes}")


def _flow(f: object, limits: Limits, snapshots: bool, seen: set[str]) -> None:
    if not isinstance(f, FlowState):
        _fail(f"must be a FlowState, not {type(f).__name__}")
    _name(f.flow_id, _FLOW_ID, "flow_id")
    if f.flow_id in seen:
        _fail(f"flow_id {f.flow_id!r} is not unique")
    seen.add(f.flow_id)
    if f.kind == "tcp":
        if f.udp is not None:
            _fail("kind 'tcp' but udp state is present")
        if not isinstance(f.tcp, TcpSnapshot):
            _fail(f"kind 'tcp' needs a TcpSnapshot, not {type(f.tcp).__name__}")
        if snapshots:
            try:
                f.tcp.validate(limits.max_queue)
            except SnapshotError as e:
                _fail(str(e))
    elif f.kind == "udp":
        if f.tcp is not None:
            _fail("kind 'udp' but tcp state is present")
        if f.udp is None:
            _fail("kind 'udp' needs a UdpState, not None")
        _udp(f.udp, limits)
    else:
        _fail(f"kind {f.kind!r} is neither 'tcp' nor 'udp'")


def _validate(doc: object, limits: Limits, snapshots: bool) -> None:
    """Every semantic rule; `snapshots=False` where TcpSnapshot checks itself anyway."""
    if not isinstance(doc, ExchangeDoc):
        _fail(f"must be an ExchangeDoc, not {type(doc).__name__}")
    if type(doc.version) is not int:
        _fail(f"version {doc.version!r} is not an int")
    if doc.version != VERSION:
        raise UnsupportedExchangeVersion(
            f"version {doc.version} is not supported (this sessmob writes version {VERSION})"
        )
    _name(doc.session_id, _NAME, "session_id")
    _name(doc.session_type, _TYPE, "session_type")
    _name(doc.source, _NAME, "source")
    seen_addr: dict[bytes, int] = {}
    for i, a in enumerate(_list(doc.addresses, limits.max_addresses, "addresses")):
        packed = _session_address(a, f"addresses[{i}]")
        if packed in seen_addr:
            _fail(f"addresses[{i}] {a!r} repeats addresses[{seen_addr[packed]}]")
        seen_addr[packed] = i
    for i, app in enumerate(_list(doc.apps, limits.max_apps, "apps")):
        if not isinstance(app, AppState):
            _fail(f"apps[{i}] must be an AppState, not {type(app).__name__}")
        _name(app.app_type, _TYPE, f"apps[{i}] app_type")
        n = _bytes_len(app.blob, f"apps[{i}] blob")
        if n > limits.max_app_state:
            _fail(f"apps[{i}] blob of {n} bytes exceeds the limit of {limits.max_app_state}")
    seen: set[str] = set()
    for i, f in enumerate(_list(doc.flows, limits.max_flows, "flows")):
        try:
            _flow(f, limits, snapshots, seen)
        except ExchangeError as e:
            fid = getattr(f, "flow_id", None)
            raise ExchangeError(f"flows[{i}] {fid!r}: {e}") from None


# -- encoding ------------------------------------------------------------------------------


_KEY = {k: msgpack.packb(k) for k in ("id", "ty", "src", "ad", "ap", "fl", "st", "k")}
_TOP_HEAD = b"\x86" + _KEY["id"]  # a map of 6, first key "id"
_APP_HEAD = b"\x82" + _KEY["ty"]  # a map of 2, first key "ty"
_FLOW_HEAD = b"\x83" + _KEY["id"]  # a map of 3, first key "id"
_TCP_KIND = _KEY["k"] + msgpack.packb("tcp") + msgpack.packb("tcp")  # k: "tcp", tcp:
_UDP_KIND = _KEY["k"] + msgpack.packb("udp") + msgpack.packb("udp")  # k: "udp", udp:


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xc6" + n.to_bytes(4, "big")
    _fail(f"a bin of {n} bytes does not fit msgpack (at most 4 GiB - 1)")


def _to_wire(doc: ExchangeDoc, limits: Limits) -> list[Any]:
    """The byte form as a list of parts (docs/exchange-format.md); `doc` is validated.

    Bulky parts (blobs, snapshots) go into the list as they are, so that the one join in
    encode() is the only copy; msgpack.packb would copy them again, growing its buffer.
    """
    pk = msgpack.Packer(use_bin_type=True)  # autoreset: each pack() returns its own bytes
    pack = pk.pack
    parts: list[Any] = [_PREFIX_V1, _TOP_HEAD, pack(doc.session_id)]
    parts += (_KEY["ty"], pack(doc.session_type), _KEY["src"], pack(doc.source))
    parts += (_KEY["ad"], pack(doc.addresses), _KEY["ap"], pk.pack_array_header(len(doc.apps)))
    for a in doc.apps:
        n = _bytes_len(a.blob, "blob")
        parts += (_APP_HEAD, pack(a.app_type), _KEY["st"], _bin_header(n), a.blob)
    parts += (_KEY["fl"], pk.pack_array_header(len(doc.flows)))
    for i, f in enumerate(doc.flows):
        if f.tcp is not None:
            s = f.tcp
            try:
                for name, n in (("receive", s.inq_len), ("send", s.outq_len)):
                    if n > limits.max_queue:  # to_bytes() checks everything else
                        raise SnapshotError(
                            f"TCP snapshot {name} queue length = {n} is outside "
                            f"0..{limits.max_queue}"
                        )
                raw = s.to_bytes()
            except SnapshotError as e:
                raise ExchangeError(f"flows[{i}] {f.flow_id!r}: {e}") from None
            parts += (_FLOW_HEAD, pack(f.flow_id), _TCP_KIND, _bin_header(len(raw)), raw)
        else:
            u = f.udp
            assert u is not None
            state = {
                "fam": _WIRE_FAMILY[u.family],
                "l": u.local,
                "r": u.remote,
                "o": u.options,
                "q": u.queued,
            }
            parts += (_FLOW_HEAD, pack(f.flow_id), _UDP_KIND, pack(state))
    return parts


# -- decoding ------------------------------------------------------------------------------

_TYPE_NAMES = [
    (0x00, 0x7F, "int"), (0x80, 0x8F, "map"), (0x90, 0x9F, "array"), (0xA0, 0xBF, "str"),
    (0xC0, 0xC0, "nil"), (0xC1, 0xC1, "reserved byte 0xc1"), (0xC2, 0xC3, "bool"),
    (0xC4, 0xC6, "bin"), (0xC7, 0xC9, "ext"), (0xCA, 0xCB, "float"), (0xCC, 0xD3, "int"),
    (0xD4, 0xD8, "ext"), (0xD9, 0xDB, "str"), (0xDC, 0xDD, "array"), (0xDE, 0xDF, "map"),
    (0xE0, 0xFF, "int"),
]  # fmt: skip
_TYPE_OF = [next(n for lo, hi, n in _TYPE_NAMES if lo <= b <= hi) for b in range(256)]
_U8, _U16, _U32, _U64 = (struct.Struct(f">{c}") for c in "BHIQ")
_I8, _I16, _I32, _I64 = (struct.Struct(f">{c}") for c in "bhiq")
# header byte -> (struct of the length/value that follows) for the sized forms
_STR_LEN = {0xD9: _U8, 0xDA: _U16, 0xDB: _U32}
_BIN_LEN = {0xC4: _U8, 0xC5: _U16, 0xC6: _U32}
_ARRAY_LEN = {0xDC: _U16, 0xDD: _U32}
_MAP_LEN = {0xDE: _U16, 0xDF: _U32}
_INT_BODY = {0xCC: _U8, 0xCD: _U16, 0xCE: _U32, 0xCF: _U64}
_INT_BODY.update({0xD0: _I8, 0xD1: _I16, 0xD2: _I32, 0xD3: _I64})


class _Reader:
    """A cursor over the msgpack body that reads only the type each position may hold.

    Every length or count is compared with its limit and with the bytes left before anything
    is sliced or allocated; a value of the wrong type is refused by its header byte alone.
    The short forms our encoder writes take an inline fast path; everything else (and every
    error) goes through the general one.
    """

    __slots__ = ("buf", "end", "pos", "view")

    def __init__(self, data: bytes | bytearray | memoryview, view: memoryview, pos: int) -> None:
        # Strings are cut from `buf` (bytes slices decode fastest), bins from `view` (no copy).
        self.buf: bytes | bytearray | memoryview = data if type(data) is bytes else view
        self.view = view
        self.pos = pos
        self.end = len(view)

    def _need(self, n: int, what: str) -> int:
        p = self.pos
        if self.end - p < n:
            _fail(f"truncated in {what} at byte {p}: {n} bytes needed, {self.end - p} left")
        self.pos = p + n
        return p

    def _head(self, what: str) -> int:
        p = self.pos
        if p >= self.end:
            _fail(f"truncated at byte {p}: {what} expected")
        self.pos = p + 1
        return self.buf[p]

    def _wrong(self, b: int, want: str, what: str) -> NoReturn:
        _fail(f"{what} must be {want}, found {_TYPE_OF[b]} at byte {self.pos - 1}")

    def _sized(self, s: struct.Struct, what: str) -> int:
        p = self._need(s.size, what)
        v: int = s.unpack_from(self.buf, p)[0]
        return v

    def map_len(self, limit: int, what: str) -> int:
        b = self._head(what)
        if 0x80 <= b <= 0x8F:
            n = b & 0x0F
        elif b in _MAP_LEN:
            n = self._sized(_MAP_LEN[b], what)
        else:
            self._wrong(b, "a map", what)
        if n > limit:
            _fail(f"{what} has {n} entries, at most {limit} are allowed")
        return n

    def array_len(self, limit: int, what: str) -> int:
        b = self._head(what)
        if 0x90 <= b <= 0x9F:
            n = b & 0x0F
        elif b in _ARRAY_LEN:
            n = self._sized(_ARRAY_LEN[b], what)
        else:
            self._wrong(b, "an array", what)
        if n > limit:
            _fail(f"{what} has {n} entries, the limit is {limit}")
        return n

    def text(self, limit: int, what: str) -> str:
        p, buf = self.pos, self.buf
        if p < self.end and 0xA0 <= buf[p] <= 0xBF:  # fixstr
            q = p + 1 + (buf[p] & 0x1F)
            if q - p - 1 <= limit and q <= self.end:
                try:
                    v = str(buf[p + 1 : q], "ascii")
                except UnicodeDecodeError:
                    pass  # the general path names the error
                else:
                    self.pos = q
                    return v
        b = self._head(what)
        if 0xA0 <= b <= 0xBF:
            n = b & 0x1F
        elif b in _STR_LEN:
            n = self._sized(_STR_LEN[b], what)
        else:
            self._wrong(b, "a str", what)
        if n > limit:
            _fail(f"{what} is a str of {n} bytes, at most {limit} are allowed")
        p = self._need(n, what)
        try:
            return str(buf[p : p + n], "ascii")
        except UnicodeDecodeError:
            _fail(f"{what} at byte {p} is not ASCII")

    def binary(self, limit: int, what: str) -> memoryview:
        b = self._head(what)
        if b not in _BIN_LEN:
            self._wrong(b, "a bin", what)
        n = self._sized(_BIN_LEN[b], what)
        if n > limit:
            _fail(f"{what} is a bin of {n} bytes, the limit is {limit}")
        p = self._need(n, what)
        return self.view[p : p + n]

    def integer(self, what: str) -> int:
        p, buf = self.pos, self.buf
        if p < self.end:
            b = buf[p]
            if b < 0x80:  # positive fixint
                self.pos = p + 1
                return b
            if b == 0xCD and p + 3 <= self.end:  # uint16: ports
                self.pos = p + 3
                return (buf[p + 1] << 8) | buf[p + 2]
        b = self._head(what)
        if b >= 0xE0:
            return b - 0x100
        s = _INT_BODY.get(b)
        if s is None:
            self._wrong(b, "an int", what)
        return self._sized(s, what)

    def nil(self) -> bool:
        """Consume a nil if one is next."""
        if self.pos < self.end and self.buf[self.pos] == 0xC0:
            self.pos += 1
            return True
        return False

    def keys(self, allowed: dict[str, int], what: str) -> Iterator[str]:
        """Yield the keys of a map of `allowed` keys (each at most once), then check that
        the map held every key whose value in `allowed` is 1 (required)."""
        n = self.map_len(len(allowed), what)
        seen: set[str] = set()
        key = what + " key"
        for _ in range(n):
            k = self.text(8, key)
            if k not in allowed:
                _fail(f"{what} has unknown key {k!r} (known: {', '.join(allowed)})")
            if k in seen:
                _fail(f"{what} repeats key {k!r}")
            seen.add(k)
            yield k
        if len(seen) != len(allowed):
            missing = [k for k, req in allowed.items() if req and k not in seen]
            if missing:
                _fail(f"{what} lacks {', '.join(map(repr, missing))}")


_TOP_KEYS = {"id": 1, "ty": 1, "src": 1, "ad": 1, "ap": 1, "fl": 1}
_APP_KEYS = {"ty": 1, "st": 1}
_FLOW_KEYS = {"id": 1, "k": 1, "tcp": 0, "udp": 0}
_UDP_KEYS = {"fam": 1, "l": 1, "r": 1, "o": 1, "q": 1}
_TOP_NAMES = {"id": "session_id", "ty": "session_type", "src": "source"}
_MAX_STR = 64  # no string field is longer (an IPv6 address with /128 is at most 49)


def _decode(data: bytes | bytearray | memoryview, limits: Limits) -> ExchangeDoc:
    try:
        view = memoryview(data).cast("B")
    except TypeError as e:
        _fail(f"must be a C-contiguous bytes-like object ({e})")
    if len(view) < PREFIX.size:
        _fail(f"truncated: {len(view)} bytes, the prefix alone needs {PREFIX.size}")
    magic, version = PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        _fail(f"not an exchange document: magic {magic!r} != {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedExchangeVersion(
            f"version {version} is not supported (this sessmob reads version {VERSION}); "
            "upgrade the older device so both run the same sessmob"
        )
    if len(view) > limits.max_document:
        _fail(f"{len(view)} bytes exceed the limit of {limits.max_document}")
    r = _Reader(data, view, PREFIX.size)
    top: dict[str, Any] = {}
    for k in r.keys(_TOP_KEYS, "document"):
        if k == "ad":
            n = r.array_len(limits.max_addresses, "addresses")
            top[k] = [r.text(_MAX_STR, "address") for _ in range(n)]
        elif k == "ap":
            n = r.array_len(limits.max_apps, "apps")
            top[k] = [_read_app(r, i, limits) for i in range(n)]
        elif k == "fl":
            n = r.array_len(limits.max_flows, "flows")
            top[k] = [_read_flow(r, i, limits) for i in range(n)]
        else:
            top[k] = r.text(_MAX_STR, _TOP_NAMES[k])
    if r.pos != r.end:
        _fail(f"has {r.end - r.pos} trailing bytes after the body (at byte {r.pos})")
    doc = ExchangeDoc(
        session_id=top["id"],
        session_type=top["ty"],
        source=top["src"],
        addresses=top["ad"],
        apps=top["ap"],
        flows=top["fl"],
    )
    _validate(doc, limits, snapshots=False)  # from_bytes validated every snapshot
    return doc


def _read_app(r: _Reader, i: int, limits: Limits) -> AppState:
    what = f"apps[{i}]"
    app_type, blob = "", b""
    for k in r.keys(_APP_KEYS, what):
        if k == "ty":
            app_type = r.text(_MAX_STR, f"{what} app_type")
        else:
            blob = bytes(r.binary(limits.max_app_state, f"{what} blob"))
    return AppState(app_type=app_type, blob=blob)


def _read_flow(r: _Reader, i: int, limits: Limits) -> FlowState:
    flow_id = kind = None
    raw_tcp: memoryview | None = None
    udp: UdpState | None = None
    try:
        for k in r.keys(_FLOW_KEYS, "flow"):
            if k == "id":
                flow_id = r.text(_MAX_STR, "flow_id")
            elif k == "k":
                kind = r.text(8, "kind")
            elif k == "tcp":
                raw_tcp = r.binary(HEADER_V1.size + 2 * limits.max_queue, "tcp snapshot")
            else:
                udp = _read_udp(r, limits)
        if kind not in _KINDS:
            _fail(f"kind {kind!r} is neither 'tcp' nor 'udp'")
        states = [s for s, present in (("tcp", raw_tcp), ("udp", udp)) if present is not None]
        if states != [kind]:
            _fail(f"kind {kind!r} but carries {' and '.join(states) or 'no'} state")
        tcp = None
        if raw_tcp is not None:
            try:
                tcp = TcpSnapshot.from_bytes(raw_tcp, max_queue=limits.max_queue)
            except SnapshotError as e:
                _fail(str(e))
    except ExchangeError as e:
        raise ExchangeError(f"flows[{i}] {flow_id!r}: {e}") from None
    return FlowState(flow_id=flow_id, kind=_KINDS[kind], tcp=tcp, udp=udp)  # type: ignore[arg-type]


def _read_endpoint(r: _Reader, what: str) -> tuple[str, int]:
    if r.array_len(2, what) != 2:
        _fail(f"{what} must be an array of 2 (address, port)")
    return (r.text(_MAX_STR, f"{what} address"), r.integer(f"{what} port"))


def _read_udp(r: _Reader, limits: Limits) -> UdpState:
    fam = socket.AF_INET
    local: tuple[str, int] = ("", 0)
    remote: tuple[str, int] | None = None
    options: dict[str, int] = {}
    queued: list[tuple[str, int, bytes]] = []
    for k in r.keys(_UDP_KEYS, "udp"):
        if k == "fam":
            wire = r.integer("udp family")
            if wire not in _HOST_FAMILY:
                _fail(f"udp family {wire} is neither 4 nor 6")
            fam = _HOST_FAMILY[wire]
        elif k == "l":
            local = _read_endpoint(r, "udp local")
        elif k == "r":
            remote = None if r.nil() else _read_endpoint(r, "udp remote")
        elif k == "o":
            n = r.map_len(MAX_UDP_OPTIONS, "udp options")
            try:
                for _ in range(n):
                    name = r.text(32, "name")
                    if name in options:
                        _fail(f"{name!r} is repeated")
                    options[name] = r.integer(name)
            except ExchangeError as e:
                raise ExchangeError(f"udp option {e}") from None
        else:
            left = limits.max_udp_bytes
            n = r.array_len(limits.max_udp_datagrams, "queued udp datagrams")
            j = 0
            try:
                for _ in range(n):
                    if r.array_len(3, "datagram") != 3:
                        _fail("datagram must be an array of 3 (address, port, payload)")
                    src = r.text(_MAX_STR, "source address")
                    port = r.integer("source port")
                    payload = r.binary(MAX_DATAGRAM, "payload")  # a view: nothing copied yet
                    left -= len(payload)
                    if left < 0:
                        _fail(f"payload takes the queue over {limits.max_udp_bytes} bytes")
                    queued.append((src, port, bytes(payload)))
                    j += 1
            except ExchangeError as e:
                raise ExchangeError(f"udp queued[{j}] {e}") from None
    return UdpState(family=fam, local=local, remote=remote, options=options, queued=queued)
