"""What an application imports to become migratable.

    kit = AppKit.connect(rm_socket, "echo", importer_types=["echo"], on_suspend=...,
                         on_prepare=..., on_import=..., on_resume=..., on_shutdown=...)
    s = kit.create_session("echo")            # the RM gives the session its own address
    sock.bind((s.address, port)) ...          # bind the session's sockets to it
    kit.add_flow(s.session_id, sock)          # the RM takes a duplicate of the socket
    ...
    kit.close()

The kit is a blocking client with one background thread that reads the RM's socket. Replies to
the application's requests are matched there, and the RM's requests run the callbacks *on that
thread*, one at a time, in the order the RM sent them:

    on_suspend(session_id) -> bytes     stop touching the session's sockets, return its state
    on_prepare(session_id, session_type)
                                        optional: an import of this session may follow
                                        (the RM holds a reservation for it). Runs before the
                                        freeze window: get ready there (start threads,
                                        allocate) so that on_import and on_resume stay short.
                                        It may never be followed by an import.
    on_import(session_id, session_type, state, flows)
                                        adopt an arriving session; flows are ImportedFlow
                                        (flow_id, kind, sock) — sockets still frozen (TCP repair
                                        mode): keep them, do not use them before on_resume
    on_resume(session_id)               use the sockets again (after a failed move, or once
                                        an imported session is activated)
    on_shutdown(session_id)             the session moved away, or an import was aborted: close
                                        its sockets without sending anything (they are frozen,
                                        so closing them is silent)

A callback that raises makes the RM's request fail with the exception's text. Callbacks sit in
the migration's freeze window: keep them short. While a callback runs no reply from the RM can
be delivered, so a callback must never make an AppKit request itself (that raises AppKitError)
nor wait for another thread that may be inside one. Waiting for threads that only touch
sockets — parking an I/O loop — is what on_suspend is for.

From asyncio: call the blocking methods through `asyncio.to_thread`, and have the callbacks
hand work to the loop with `loop.call_soon_threadsafe` (waiting on a concurrent future if the
callback needs the loop's answer, e.g. the state blob).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sessmob.appproto import (
    DEFAULT_LIMITS,
    PROTO_VERSION,
    RECV_SIZE,
    RM_REQUESTS,
    Decoder,
    Limits,
    Message,
    ProtocolError,
    encode_reply,
    encode_request,
    recv_chunk,
    send_frame,
)
from sessmob.closing import Closing
from sessmob.hotpath import gc_paused

__all__ = [
    "AppKit",
    "AppKitError",
    "ImportedFlow",
    "SessionHandle",
]

_log = logging.getLogger(__name__)


class AppKitError(RuntimeError):
    """A request to the RM failed (refused, timed out) or the connection to it is gone."""


@dataclass(frozen=True)
class SessionHandle:
    """A session this application runs: its id, type and own addresses ("addr/prefixlen")."""

    session_id: str
    session_type: str
    addresses: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The first session address without its prefix length (what to bind sockets to)."""
        if not self.addresses:
            raise AppKitError(f"session {self.session_id} has no address")
        return self.addresses[0].partition("/")[0]

    def owns(self, host: str) -> bool:
        """Whether `host` (e.g. a socket's local address, v4-mapped or not) is a session address."""
        ip = _ip(host)
        return ip is not None and any(_ip(a.partition("/")[0]) == ip for a in self.addresses)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ImportedFlow(NamedTuple):
    """One flow of an imported session; unpacks as (flow_id, kind, sock)."""

    flow_id: str
    kind: str  # "tcp" | "udp"
    sock: socket.socket


SuspendCb = Callable[[str], bytes]
ImportCb = Callable[[str, str, bytes, list[ImportedFlow]], None]
PrepareCb = Callable[[str, str], None]
SessionCb = Callable[[str], None]


class _Refused(Exception):
    """The RM refused the connection (e.g. the user is not allowed)."""


class _Waiter:
    __slots__ = ("event", "msg", "op")

    def __init__(self, op: str) -> None:
        self.op = op
        self.event = threading.Event()
        self.msg: Message | None = None


class AppKit(Closing):
    """A connection to the local Relocation Manager (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        *,
        importer_types: Sequence[str] = (),
        on_suspend: SuspendCb | None = None,
        on_prepare: PrepareCb | None = None,
        on_import: ImportCb | None = None,
        on_resume: SessionCb | None = None,
        on_shutdown: SessionCb | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        timeout: float = 2.0,
    ) -> None:
        """Use AppKit.connect(); this wraps an already connected unix socket."""
        self.name = name
        self.importer_types = list(importer_types)
        self.timeout = timeout
        self.app_id: str | None = None
        self.limits: Limits = DEFAULT_LIMITS  # the RM's, after hello
        self._sock = sock
        self._on_suspend = on_suspend
        self._on_prepare = on_prepare
        self._on_import = on_import
        self._on_resume = on_resume
        self._on_shutdown = on_shutdown
        self._on_disconnect = on_disconnect
        self._decoder = Decoder(RM_REQUESTS, DEFAULT_LIMITS)
        self._ids = itertools.count(1)
        self._next_id = 1
        self._lock = threading.Lock()  # waiters, sessions, closed state
        self._send_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._sessions: dict[str, SessionHandle] = {}
        # Sockets the RM handed over before an import (prepare), by session id.
        self._prepared: dict[str, list[ImportedFlow]] = {}
        self._closed: str | None = None  # why the connection is gone
        self._closing = False
        self._reader = threading.Thread(target=self._read_loop, name=f"appkit-{name}", daemon=True)

    # -- public API ----------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | None,
        name: str,
        *,
        importer_types: Iterable[str] = (),
        on_suspend: SuspendCb | None = None,
        on_prepare: PrepareCb | None = None,
        on_import: ImportCb | None = None,
        on_resume: SessionCb | None = None,
        on_shutdown: SessionCb | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        timeout: float = 2.0,
    ) -> AppKit:
        """Connect to the RM's application socket and say hello.

        `path` None: take it from $SESSMOB_RM_SOCKET (set for importers the RM launches).
        `importer_types`: session types this application can take over from another device.
        `on_disconnect(reason)` runs (on the kit's thread) if the connection is lost.
        """
        if path is None:
            from sessmob.appproto import ENV_SOCKET

            path = os.environ.get(ENV_SOCKET)
            if not path:
                raise AppKitError(f"no RM socket given and ${ENV_SOCKET} is not set")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise AppKitError(
                f"cannot connect to the Relocation Manager at {path}: {e.strerror or e}"
                " (is `sessmob rm` running with this state directory?)"
            ) from e
        kit = cls(
            sock,
            name,
            importer_types=list(importer_types),
            on_suspend=on_suspend,
            on_prepare=on_prepare,
            on_import=on_import,
            on_resume=on_resume,
            on_shutdown=on_shutdown,
            on_disconnect=on_disconnect,
            timeout=timeout,
        )
        kit._reader.start()
        try:
            res = kit._request(
                "hello",
                {
                    "proto": PROTO_VERSION,
                    "name": name,
                    "pid": os.getpid(),
                    "importer_types": kit.importer_types,
                },
            )
        except BaseException:
            kit.close()
            raise
        kit.app_id = res["app_id"]
        kit.limits = Limits(res["max_frame"], res["max_fds"])
        return kit

    def create_session(self, session_type: str) -> SessionHandle:
        """A new session of `session_type`; the RM has given it its own address(es)."""
        res = self._request("create_session", {"session_type": session_type})
        handle = SessionHandle(res["session_id"], session_type, list(res["addresses"]))
        with self._lock:
            self._sessions[handle.session_id] = handle
        return handle

    def add_flow(self, session_id: str, sock: socket.socket, flow_id: str | None = None) -> str:
        """Make a TCP or UDP socket part of the session; returns its flow id.

        The RM gets a duplicate of the descriptor; the application keeps using its own.
        """
        fields: dict[str, Any] = {"session_id": session_id}
        if flow_id is not None:
            fields["flow_id"] = flow_id
        res = self._request("add_flow", fields, [sock.fileno()])
        return str(res["flow_id"])

    def remove_flow(self, session_id: str, flow_id: str) -> None:
        """Take a flow out of the session (e.g. before closing a finished connection).

        The RM closes its duplicate; close the socket yourself afterwards. Refused while the
        session is suspended.
        """
        self._request("remove_flow", {"session_id": session_id, "flow_id": flow_id})

    def close_session(self, session_id: str) -> None:
        """End the session: the RM forgets it and frees its address(es)."""
        self._request("close_session", {"session_id": session_id})
        with self._lock:
            self._sessions.pop(session_id, None)

    def sessions(self) -> list[SessionHandle]:
        """Sessions this application runs (created here or imported)."""
        with self._lock:
            return list(self._sessions.values())

    def session(self, session_id: str) -> SessionHandle:
        with self._lock:
            try:
                return self._sessions[session_id]
            except KeyError:
                raise AppKitError(f"no session {session_id!r} in this application") from None

    @property
    def connected(self) -> bool:
        return self._closed is None

    def close(self) -> None:
        """Disconnect. The RM forgets this application's sessions (their sockets keep working
        here, but can no longer move)."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            self._reader.join(5.0)
        self._lost("closed by the application")

    # -- requests ------------------------------------------------------------------------------

    def _request(self, op: str, fields: dict[str, Any], fds: list[int] | None = None) -> Any:
        if threading.current_thread() is self._reader:
            raise AppKitError(
                f"{op}: AppKit requests cannot be made from inside a callback (the reply would"
                " need the thread that runs it); hand the work to another thread"
            )
        fds = fds or []
        waiter = _Waiter(op)
        with self._lock:
            if self._closed is not None:
                raise AppKitError(f"{op}: not connected to the RM ({self._closed})")
            msg_id = next(self._ids)
            self._next_id = msg_id + 1
            self._waiters[msg_id] = waiter
        try:
            frame = encode_request(op, msg_id, fields, len(fds), self.limits)
        except ProtocolError as e:
            with self._lock:
                self._waiters.pop(msg_id, None)
            raise AppKitError(f"{op}: {e}") from e
        try:
            with self._send_lock:
                send_frame(self._sock, frame, fds)
        except OSError as e:
            with self._lock:
                self._waiters.pop(msg_id, None)
            self._reader.join(self.timeout)  # the RM closed: its last words say why
            raise AppKitError(f"{op}: sending to the RM failed: {self._closed or e}") from e
        if not waiter.event.wait(self.timeout):
            with self._lock:
                self._waiters.pop(msg_id, None)
            raise AppKitError(f"{op}: the RM did not answer within {self.timeout:g} s")
        msg = waiter.msg
        if msg is None:
            raise AppKitError(f"{op}: connection to the RM lost ({self._closed})")
        if not msg.ok:
            raise AppKitError(f"{op} refused by the RM: {msg.error}")
        return msg.result(op)

    # -- reader thread -------------------------------------------------------------------------

    def _read_loop(self) -> None:
        reason = "connection closed by the RM"
        buf = bytearray(RECV_SIZE)
        msgs: list[Message] = []
        try:
            while True:
                data, fds = recv_chunk(self._sock, buf)
                if not data:
                    for fd in fds:
                        os.close(fd)
                    self._decoder.eof()
                    break
                msgs = self._decoder.feed(data, fds)
                while msgs:
                    msg = msgs.pop(0)
                    if msg.is_reply:
                        self._deliver(msg)
                    else:
                        self._serve(msg)
        except _Refused as e:
            reason = f"refused by the RM: {e}"
        except ProtocolError as e:
            reason = f"protocol error from the RM: {e}"
            _log.error("%s: %s; disconnecting", self.name, reason)
        except OSError as e:
            reason = "closed" if self._closing else f"connection to the RM failed: {e}"
        except BaseException as e:  # the reader must not die silently
            reason = f"AppKit reader crashed: {e!r}"
            _log.exception("%s: AppKit reader crashed", self.name)
        finally:
            for m in msgs:
                m.close_fds()
            self._lost(reason)

    def _deliver(self, msg: Message) -> None:
        with self._lock:
            waiter = self._waiters.pop(msg.id, None)
            late = msg.id < self._next_id
        if msg.id == 0 and not msg.ok:  # the RM refuses the whole connection
            raise _Refused(msg.error)
        if waiter is None:
            if late:  # its requester gave up waiting
                _log.warning("%s: late reply to request %d ignored", self.name, msg.id)
                return
            raise ProtocolError(f"reply to request {msg.id}, which was never sent")
        if msg.ok:
            msg.result(waiter.op)  # validate the fields here: a bad reply drops the connection
        waiter.msg = msg
        waiter.event.set()

    def _serve(self, msg: Message) -> None:
        try:
            with gc_paused():  # suspend, import and resume run inside the freeze window
                result = self._handle(msg)
        except Exception as e:
            msg.close_fds()
            _log.warning("%s: %s of session %s failed: %s", self.name, msg.op,
                         msg.body.get("session_id"), e)  # fmt: skip
            frame = encode_reply(msg.id, error=f"{self.name}: {type(e).__name__}: {e}")
        else:
            try:
                frame = encode_reply(msg.id, result, limits=self.limits)
            except ProtocolError as e:  # e.g. a state blob beyond the RM's frame limit
                frame = encode_reply(msg.id, error=f"{self.name}: {e}")
        with self._send_lock:
            send_frame(self._sock, frame)

    def _handle(self, msg: Message) -> dict[str, Any]:
        sid: str = msg.body["session_id"]
        op = msg.op
        if op == "import":
            return self._import(msg)
        if op == "prepare":
            return self._prepare(msg)
        with self._lock:
            known = sid in self._sessions
        if op == "shutdown":
            self._drop_prepared(sid)  # an import that will not come
            if known:
                if self._on_shutdown is None:
                    raise AppKitError("application has no on_shutdown handler")
                self._on_shutdown(sid)
                with self._lock:
                    self._sessions.pop(sid, None)
            return {}  # unknown: nothing to shut down
        if not known:
            raise AppKitError(f"no session {sid!r} in this application")
        if op == "suspend":
            if self._on_suspend is None:
                raise AppKitError("application has no on_suspend handler")
            state = self._on_suspend(sid)
            if not isinstance(state, bytes | bytearray | memoryview):
                raise AppKitError(f"on_suspend returned {type(state).__name__}, not bytes")
            return {"state": bytes(state)}
        if op == "resume":
            if self._on_resume is None:
                raise AppKitError("application has no on_resume handler")
            self._on_resume(sid)
            return {}
        raise ProtocolError(f"unhandled operation {op!r}")  # the decoder admits no other

    def _adopt_fds(self, msg: Message) -> list[ImportedFlow]:
        """The descriptors that came with `msg` as sockets, one per entry of its flows."""
        flows: list[ImportedFlow] = []
        fds, msg.fds = msg.fds, []
        try:
            for entry, fd in zip(msg.body["flows"], fds, strict=True):
                sock = socket.socket(fileno=fd)
                flows.append(ImportedFlow(entry["flow_id"], entry["kind"], sock))
        except Exception:
            _close_all(flows)
            for fd in fds[len(flows) :]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return flows

    def _prepare(self, msg: Message) -> dict[str, Any]:
        """Sockets for a session about to be imported, handed over ahead of its state (they
        stay unused until on_import, and are closed if the import does not come)."""
        sid: str = msg.body["session_id"]
        flows = self._adopt_fds(msg)
        try:
            with self._lock:
                if sid in self._sessions:
                    raise AppKitError(f"session {sid!r} already runs in this application")
            if self._on_prepare is not None:
                self._on_prepare(sid, msg.body["session_type"])
        except BaseException:
            _close_all(flows)
            raise
        with self._lock:
            old = self._prepared.pop(sid, None)
            self._prepared[sid] = flows
        if old:
            _close_all(old)
        return {}

    def _drop_prepared(self, sid: str) -> None:
        with self._lock:
            flows = self._prepared.pop(sid, None)
        if flows:
            _close_all(flows)

    def _import(self, msg: Message) -> dict[str, Any]:
        body = msg.body
        sid: str = body["session_id"]
        with self._lock:
            if sid in self._sessions:
                raise AppKitError(f"session {sid!r} already runs in this application")
        if self._on_import is None:
            raise AppKitError("application is not an importer (no on_import handler)")
        if body.get("prepared"):
            with self._lock:
                flows = self._prepared.pop(sid, None)
            if flows is None:
                raise AppKitError(f"import of session {sid!r}: no sockets were prepared for it")
            want = [(f["flow_id"], f["kind"]) for f in body["flows"]]
            if [(f.flow_id, f.kind) for f in flows] != want:
                _close_all(flows)
                raise AppKitError(f"import of session {sid!r}: flows differ from the prepared")
        else:
            self._drop_prepared(sid)  # the RM built the sockets anew: these are not used
            flows = self._adopt_fds(msg)
        handle = SessionHandle(sid, body["session_type"], list(body["addresses"]))
        try:
            self._on_import(sid, body["session_type"], body["state"], flows)
        except BaseException:
            _close_all(flows)
            raise
        with self._lock:
            self._sessions[sid] = handle
        return {}

    def _lost(self, reason: str) -> None:
        with self._lock:
            if self._closed is not None:
                return
            self._closed = reason
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for w in waiters:
            w.event.set()
        with self._lock:
            prepared, self._prepared = list(self._prepared.values()), {}
        for flows in prepared:
            _close_all(flows)
        self._decoder.close()
        with contextlib.suppress(OSError):
            self._sock.close()
        if not self._closing:
            _log.warning("%s: lost the connection to the RM: %s", self.name, reason)
            if self._on_disconnect is not None:
                try:
                    self._on_disconnect(reason)
                except Exception:
                    _log.exception("%s: on_disconnect failed", self.name)


def _close_all(flows: Iterable[ImportedFlow]) -> None:
    for f in flows:
        with contextlib.suppress(OSError):
            f.sock.close()
