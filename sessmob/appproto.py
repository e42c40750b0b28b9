"""The application protocol: framing and messages between an application and its RM.

Shared by both ends — `sessmob.appkit` (the application) and `sessmob.adapters.application`
(the Relocation Manager). docs/app-protocol.md is the specification; this module is its code.

Transport: a unix stream socket (`{state_dir}/app.sock`). A frame is a 4-byte big-endian length
followed by that many bytes of one msgpack map. File descriptors ride along with SCM_RIGHTS,
attached to the first bytes of the frame that carries them (a frame says how many in `nfd`);
more than the kernel's 253 per message go in several batches, each on its own slice of the
frame's bytes. Requests go both ways and carry an `id` the sender picks; a reply names that
`id`, so each end matches replies to its own requests while it serves the other end's.

Everything received is validated before it is used: length, msgpack well-formedness, map keys,
the operation, every field's type and size, and the number of descriptors. Any violation is a
ProtocolError and the receiver drops the connection; nothing else changes. This module is
sans-IO except for the small send/receive helpers at the end.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTO_VERSION = 2  # 2: prepare, and import with prepared sockets
HEADER = struct.Struct("!I")
SCM_MAX_FD = 253  # the kernel's limit of descriptors in one SCM_RIGHTS message
MAX_ID = (1 << 63) - 1
MAX_NAME = 256  # identifiers: names, session and flow ids, session types, addresses
MAX_ERROR = 4096  # error strings
MAX_LIST = 4096  # addresses

ENV_SOCKET = "SESSMOB_RM_SOCKET"
"""Environment variable with the RM's application socket (set for importers the RM launches)."""
ENV_IMPORT_TYPE = "SESSMOB_IMPORT_TYPE"
"""Environment variable with the session type a launched importer was started for."""


@dataclass(frozen=True)
class Limits:
    """What one end accepts; the RM tells the application its limits in the hello reply."""

    max_frame: int = 16 << 20  # bytes of one frame's msgpack body (the state blob rides in it)
    max_fds: int = 4096  # descriptors on one frame (one per flow of an imported session)

    def __post_init__(self) -> None:
        if not 64 <= self.max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame {self.max_frame}: must be between 64 and 2**32-1")
        if not 1 <= self.max_fds <= 65536:
            raise ValueError(f"max_fds {self.max_fds}: must be between 1 and 65536")


DEFAULT_LIMITS = Limits()


class ProtocolError(Exception):
    """The peer broke the protocol (malformed, oversized, unknown or unexpected frame).

    The connection it arrived on is dropped; nothing else changes.
    """


# -- message schemas ---------------------------------------------------------------------------

Check = Callable[[str, Any], None]  # (where, value) -> None or ProtocolError
Schema = Mapping[str, tuple[Check, bool]]  # field -> (check, required)


def _tname(v: Any) -> str:
    return type(v).__name__


def _str(limit: int = MAX_NAME, *, empty: bool = False) -> Check:
    def check(where: str, v: Any) -> None:
        if not isinstance(v, str):
            raise ProtocolError(f"{where} must be a string, got {_tname(v)}")
        if len(v) > limit or (not empty and not v):
            raise ProtocolError(f"{where}: string of {len(v)} characters, must be 1..{limit}")

    return check


def _int(where: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{where} must be an integer, got {_tname(v)}")
    if not 0 <= v <= MAX_ID:
        raise ProtocolError(f"{where}: {v} out of range 0..2**63-1")


def _bool(where: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ProtocolError(f"{where} must be a boolean, got {_tname(v)}")


def _bytes(where: str, v: Any) -> None:
    if not isinstance(v, bytes):
        raise ProtocolError(f"{where} must be bytes (msgpack bin), got {_tname(v)}")


def _optional(inner: Check) -> Check:
    def check(where: str, v: Any) -> None:
        if v is not None:
            inner(where, v)

    return check


def _list(inner: Check, limit: int = MAX_LIST) -> Check:
    def check(where: str, v: Any) -> None:
        if not isinstance(v, list):
            raise ProtocolError(f"{where} must be a list, got {_tname(v)}")
        if len(v) > limit:
            raise ProtocolError(f"{where}: {len(v)} entries exceed the limit of {limit}")
        for i, item in enumerate(v):
            inner(f"{where}[{i}]", item)

    return check


def _map(schema: Schema) -> Check:
    def check(where: str, v: Any) -> None:
        if not isinstance(v, dict):
            raise ProtocolError(f"{where} must be a map, got {_tname(v)}")
        _check_fields(where, v, schema)

    return check


def _one_of(*values: str) -> Check:
    def check(where: str, v: Any) -> None:
        if v not in values:
            raise ProtocolError(f"{where} must be one of {', '.join(values)}, got {v!r}")

    return check


def _check_fields(where: str, body: dict[str, Any], schema: Schema) -> None:
    for key in body:
        if key not in schema:
            raise ProtocolError(f"{where}: unknown field {key!r}")
    for key, (check, required) in schema.items():
        if key in body:
            check(f"{where}.{key}", body[key])
        elif required:
            raise ProtocolError(f"{where}: missing field {key!r}")


NAME, ERROR = _str(), _str(MAX_ERROR, empty=True)
_FLOW = _map({"flow_id": (NAME, True), "kind": (_one_of("tcp", "udp"), True)})
_SID = {"session_id": (NAME, True)}

APP_REQUESTS: dict[str, Schema] = {
    "hello": {
        "proto": (_int, True),
        "name": (NAME, True),
        "pid": (_int, True),
        "importer_types": (_list(NAME, 64), True),
    },
    "create_session": {"session_type": (NAME, True)},
    "add_flow": {**_SID, "flow_id": (_optional(NAME), False)},
    "remove_flow": {**_SID, "flow_id": (NAME, True)},
    "close_session": _SID,
}
"""Requests an application sends to the RM: op -> fields (check, required)."""

RM_REQUESTS: dict[str, Schema] = {
    "suspend": _SID,
    "prepare": {
        **_SID,
        "session_type": (NAME, True),
        "flows": (_list(_FLOW, 65536), True),
    },
    "import": {
        **_SID,
        "session_type": (NAME, True),
        "state": (_bytes, True),
        "addresses": (_list(NAME), True),
        "flows": (_list(_FLOW, 65536), True),
        "prepared": (_bool, False),
    },
    "resume": _SID,
    "shutdown": _SID,
}
"""Requests the RM sends to an application."""

RESULTS: dict[str, Schema] = {
    "hello": {
        "app_id": (NAME, True),
        "proto": (_int, True),
        "max_frame": (_int, True),
        "max_fds": (_int, True),
    },
    "create_session": {**_SID, "addresses": (_list(NAME), True)},
    "add_flow": {"flow_id": (NAME, True)},
    "remove_flow": {},
    "close_session": {},
    "suspend": {"state": (_bytes, True)},
    "prepare": {},
    "import": {},
    "resume": {},
    "shutdown": {},
}
"""Fields of a successful reply, by the op it answers."""


def fds_expected(op: str, body: Mapping[str, Any]) -> int:
    """How many descriptors a request must carry."""
    if op == "add_flow":
        return 1
    if op == "prepare" or (op == "import" and not body.get("prepared")):
        return len(body["flows"])
    return 0


# -- messages ----------------------------------------------------------------------------------


@dataclass
class Message:
    """One decoded frame: a request (`op` names it) or a reply (`op` == "reply").

    `id` is the request's id; a reply carries the id of the request it answers. `fds` are the
    descriptors that came with the frame: the receiver owns them and must close or adopt them.
    """

    op: str
    id: int
    body: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.op == "reply"

    @property
    def ok(self) -> bool:
        return bool(self.body.get("ok"))

    @property
    def error(self) -> str:
        return str(self.body.get("error", ""))

    def result(self, request_op: str) -> dict[str, Any]:
        """The fields of a successful reply to `request_op`, validated (ProtocolError if not)."""
        res = {k: v for k, v in self.body.items() if k != "ok"}
        _check_fields(f"reply to {request_op}", res, RESULTS[request_op])
        return res

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def _ext_refused(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} not allowed")


def _pack(obj: dict[str, Any], limits: Limits) -> bytes:
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {obj.get('op')!r} message: {e}") from e
    if len(body) > limits.max_frame:
        raise ProtocolError(
            f"{obj.get('op')!r} message of {len(body)} bytes exceeds the frame limit of"
            f" {limits.max_frame} bytes"
        )
    return HEADER.pack(len(body)) + body


def encode_request(
    op: str, msg_id: int, fields: Mapping[str, Any], nfds: int = 0, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """A request frame. `fields` must match the op's schema (checked here too)."""
    schema = APP_REQUESTS.get(op) or RM_REQUESTS.get(op)
    if schema is None:
        raise ProtocolError(f"unknown operation {op!r}")
    body = dict(fields)
    _check_fields(op, body, schema)
    if nfds != fds_expected(op, body):
        raise ProtocolError(f"{op} carries {fds_expected(op, body)} descriptors, not {nfds}")
    if nfds > limits.max_fds:
        raise ProtocolError(f"{op} with {nfds} descriptors exceeds the limit of {limits.max_fds}")
    obj: dict[str, Any] = {"op": op, "id": msg_id, **body}
    if nfds:
        obj["nfd"] = nfds
    return _pack(obj, limits)


def encode_reply(
    msg_id: int, result: Mapping[str, Any] | None = None, *, error: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:  # fmt: skip
    """A reply frame: success with `result` fields, or failure with an `error` text."""
    obj: dict[str, Any] = {"op": "reply", "id": msg_id}
    if error is not None:
        obj["ok"] = False
        obj["error"] = error[:MAX_ERROR]
    else:
        obj["ok"] = True
        obj.update(result or {})
    return _pack(obj, limits)


class Decoder:
    """Turns received bytes and descriptors into validated Messages (sans-IO).

    `accepts` is the set of request ops this end serves; anything else but a reply is a
    ProtocolError. After a ProtocolError the decoder is unusable and holds no descriptors.
    """

    def __init__(self, accepts: Mapping[str, Schema], limits: Limits):
        self._accepts = accepts
        self._limits = limits
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self._failed: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | memoryview, fds: Iterable[int] = ()) -> list[Message]:
        """Add received bytes (and the descriptors that came with them); return whole frames.

        The caller hands over ownership of `fds`: they end up in a Message or are closed.
        """
        if self._failed is not None:
            for fd in fds:
                _close(fd)
            raise self._failed
        self._fds.extend(fds)
        self._buf += data
        out: list[Message] = []
        try:
            while True:
                msg = self._next()
                if msg is None:
                    break
                out.append(msg)
            if len(self._fds) > self._limits.max_fds:
                raise ProtocolError(
                    f"{len(self._fds)} descriptors pending exceed the limit of"
                    f" {self._limits.max_fds}"
                )
            if self._fds and not self._buf:
                raise ProtocolError(f"{len(self._fds)} descriptor(s) arrived that no frame claims")
        except ProtocolError as e:
            for m in out:
                m.close_fds()
            self._fail(e)
            raise
        return out

    def eof(self) -> None:
        """The peer closed: a half-received frame is a ProtocolError (truncated)."""
        if self._failed is None and (self._buf or self._fds):
            self._fail(
                ProtocolError(
                    f"connection closed inside a frame ({len(self._buf)} bytes and"
                    f" {len(self._fds)} descriptors of it received)"
                )
            )
            raise self._failed  # type: ignore[misc]
        self.close()

    def close(self) -> None:
        """Close every descriptor not yet handed out."""
        while self._fds:
            _close(self._fds.popleft())
        self._buf.clear()

    def _fail(self, e: ProtocolError) -> None:
        self._failed = e
        self.close()

    def _next(self) -> Message | None:
        buf = self._buf
        if len(buf) < HEADER.size:
            return None
        (n,) = HEADER.unpack_from(buf)
        if n == 0:
            raise ProtocolError("empty frame (length 0)")
        if n > self._limits.max_frame:
            raise ProtocolError(
                f"frame of {n} bytes exceeds the limit of {self._limits.max_frame} bytes"
            )
        end = HEADER.size + n
        if len(buf) < end:
            return None
        raw = bytes(buf[HEADER.size : end])
        del buf[:end]
        obj = _unpack(raw, n)
        op = obj.get("op")
        if not isinstance(op, str):
            raise ProtocolError(f"frame without a string 'op' (got {_tname(op)})")
        msg_id = obj.get("id")
        _int(f"{op}.id", msg_id)
        nfd = obj.get("nfd", 0)
        _int(f"{op}.nfd", nfd)
        if nfd > self._limits.max_fds:
            raise ProtocolError(
                f"{op} frame carries {nfd} descriptors, more than the limit of"
                f" {self._limits.max_fds}"
            )
        if nfd > len(self._fds):
            raise ProtocolError(
                f"{op} frame says it carries {nfd} descriptors but {len(self._fds)} arrived"
            )
        body = {k: v for k, v in obj.items() if k not in ("op", "id", "nfd")}
        if op == "reply":
            if nfd:
                raise ProtocolError("a reply may not carry descriptors")
            _check_reply(body)
        else:
            schema = self._accepts.get(op)
            if schema is None:
                known = op in APP_REQUESTS or op in RM_REQUESTS
                why = "not accepted in this direction" if known else "unknown operation"
                raise ProtocolError(f"{why}: {op!r}")
            _check_fields(op, body, schema)
            want = fds_expected(op, body)
            if nfd != want:
                raise ProtocolError(f"{op} must carry {want} descriptor(s), frame says {nfd}")
        fds = [self._fds.popleft() for _ in range(nfd)]
        return Message(op, msg_id, body, fds)  # type: ignore[arg-type]


def _check_reply(body: dict[str, Any]) -> None:
    ok = body.get("ok")
    _bool("reply.ok", ok)
    if not ok:
        _check_fields("reply", body, {"ok": (_bool, True), "error": (ERROR, True)})
    elif "error" in body:
        raise ProtocolError("a successful reply may not carry 'error'")


def _unpack(raw: bytes, n: int) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            ext_hook=_ext_refused,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several types for bad input
        raise ProtocolError(f"frame of {n} bytes is not valid msgpack: {e}") from e
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must hold a msgpack map, got {_tname(obj)}")
    for k in obj:
        if not isinstance(k, str):
            raise ProtocolError(f"map keys must be strings, got {_tname(k)}")
    return obj


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


# -- I/O helpers -------------------------------------------------------------------------------

_CMSG_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
RECV_SIZE = 64 * 1024


def recv_chunk(sock: socket.socket, buf: bytearray | None = None) -> tuple[memoryview, list[int]]:
    """One recvmsg into `buf` (reused by the caller: no allocation per call).

    Returns a view of the bytes received (valid until the next call with the same buffer)
    and the descriptors that came with them (close-on-exec). Raises ProtocolError if the
    kernel had to drop descriptors (more than one message holds) or a control message other
    than SCM_RIGHTS arrived; BlockingIOError on a non-blocking socket with nothing to read.
    An empty view means the peer closed.
    """
    if buf is None:
        buf = bytearray(RECV_SIZE)
    n, anc, flags, _ = sock.recvmsg_into([buf], _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    bad: str | None = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
        else:
            bad = f"unexpected control message (level {level}, type {kind})"
    if flags & socket.MSG_CTRUNC:
        bad = f"more than {SCM_MAX_FD} descriptors in one message (the kernel dropped some)"
    if bad is not None:
        for fd in fds:
            _close(fd)
        raise ProtocolError(bad)
    return memoryview(buf)[:n], fds


def _plan(frame: bytes, fds: list[int]) -> list[tuple[memoryview, list[int]]]:
    """Slices of the frame to send, each with the descriptors to attach to it.

    One slice for up to 253 descriptors; beyond, one byte per extra batch of 253 descriptors
    and the rest with the last batch (the receiver collects descriptors until the frame ends).
    """
    view = memoryview(frame)
    if len(fds) <= SCM_MAX_FD:
        return [(view, fds)]
    batches = [fds[i : i + SCM_MAX_FD] for i in range(0, len(fds), SCM_MAX_FD)]
    if len(frame) < len(batches):
        raise ProtocolError(f"frame of {len(frame)} bytes too short for {len(fds)} descriptors")
    plan = [(view[i : i + 1], b) for i, b in enumerate(batches[:-1])]
    plan.append((view[len(batches) - 1 :], batches[-1]))
    return plan


def _anc(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def send_frame(sock: socket.socket, frame: bytes, fds: list[int] | None = None) -> None:
    """Send a whole frame with its descriptors on a blocking socket (caller serialises)."""
    for part, batch in _plan(frame, list(fds or ())):
        sent = sock.sendmsg([part], _anc(batch))
        if sent < len(part):
            sock.sendall(part[sent:])


async def send_frame_async(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    frame: bytes,
    fds: list[int] | None = None,
) -> None:
    """Send a whole frame on a non-blocking socket (caller serialises)."""
    for part, batch in _plan(frame, list(fds or ())):
        anc = _anc(batch)
        while part:
            try:
                sent = sock.sendmsg([part], anc)
            except (BlockingIOError, InterruptedError):
                await _writable(loop, sock)
                continue
            part = part[sent:]
            anc = []  # the descriptors went with the first bytes


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


# -- peer credentials --------------------------------------------------------------------------

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """The connecting process's credentials (SO_PEERCRED, taken at connect time)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def uid_allowed(uid: int, allowed_uids: Iterable[int]) -> bool:
    """Root is always allowed; anyone else only if listed."""
    return uid == 0 or uid in set(allowed_uids)


def is_disconnect(e: OSError) -> bool:
    """A send/receive error that just means the peer went away."""
    return e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
