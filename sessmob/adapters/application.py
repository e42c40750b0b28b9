"""The application adapter: the RM's side of the application protocol (docs/app-protocol.md).

`AppServer` listens on the RM's unix socket (`{state_dir}/app.sock`), checks each caller with
SO_PEERCRED, and serves the applications' requests (hello, create_session, add_flow,
remove_flow, close_session) through a `SessionHost` — the RM daemon, which owns sessions,
addresses and flows. It also sends the RM's requests to applications (suspend, import, resume,
shutdown) and launches configured importers. `ApplicationAdapter` is interface A on top of it.

Everything runs on the RM's event loop; reads are callbacks on the socket (no task per frame),
so a reply reaches the waiting coroutine with one loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pwd
import select
import socket
import stat
import subprocess
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sessmob.adapters.base import Refused, Role, TransferOffer
from sessmob.appproto import (
    APP_REQUESTS,
    DEFAULT_LIMITS,
    ENV_IMPORT_TYPE,
    ENV_SOCKET,
    PROTO_VERSION,
    RECV_SIZE,
    Decoder,
    Limits,
    Message,
    PeerCred,
    ProtocolError,
    encode_reply,
    encode_request,
    is_disconnect,
    peer_cred,
    recv_chunk,
    send_frame_async,
    uid_allowed,
)
from sessmob.exchange import AppState, ExchangeDoc
from sessmob.listening import accept_failed
from sessmob.session import Flow, ServiceSession

__all__ = [
    "AppError",
    "AppServer",
    "ApplicationAdapter",
    "ImporterSpec",
    "SessionHost",
]

_log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0  # seconds a connection may stay silent before its hello
LAUNCH_TIMEOUT = 10.0  # default seconds a launched importer has to say hello
MAX_INFLIGHT = 64  # requests of one application served at once (more: protocol error)
SOCKET_WAIT = 0.02  # seconds an RM request waits for its answer on the socket, loop held
PREENCODED = ("suspend", "resume")  # requests of the freeze window encoded ahead (preencode)


class SessionHost(Protocol):
    """What AppServer needs from the RM daemon: it owns sessions, addresses and flows.

    Optionally the host also implements `async def remove_flow(session_id, flow_id) -> None`;
    without it AppServer removes the flow from the session object and closes the RM's socket.
    """

    async def create_session(self, app_id: str, session_type: str) -> ServiceSession:
        """A new session for the application: id allocated, own address added and announced."""
        ...

    async def add_flow(self, session_id: str, sock: socket.socket, flow_id: str | None) -> Flow:
        """Add a socket (the RM's duplicate, now owned by the host) to the session."""
        ...

    async def close_session(self, session_id: str) -> None:
        """Forget the session, close the RM's sockets of it, free its address."""
        ...


class AppError(RuntimeError):
    """An application failed, timed out, misbehaved or is missing (the message says which)."""


@dataclass
class ImporterSpec:
    """How to launch an importer (from the RM's TOML config, `[importers.TYPE]`)."""

    command: list[str]
    user: str | None = None  # run as this user (never root when set); None: the RM's user
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Launch:
    session_type: str
    proc: subprocess.Popen[bytes]
    started: float


class _Phase:
    ACTIVE = "active"  # running in the application
    SUSPENDED = "suspended"  # suspend sent (or answered): inside a move on ED
    IMPORTED = "imported"  # import sent: on ID, not yet resumed


@dataclass
class _Owned:
    app_id: str
    session: ServiceSession
    phase: str = _Phase.ACTIVE


class _Conn:
    """One connected application."""

    def __init__(self, sock: socket.socket, cred: PeerCred, serial: int) -> None:
        self.sock = sock
        self.cred = cred
        self.serial = serial
        self.app_id = f"conn#{serial}"  # until hello names it
        self.name = ""
        self.importer_types: list[str] = []
        self.helloed = False
        self.decoder = Decoder(APP_REQUESTS, DEFAULT_LIMITS)
        self.rbuf = bytearray(RECV_SIZE)
        self.poller = select.poll()  # for waits on the socket inside the freeze window
        self.poller.register(sock.fileno(), select.POLLIN)
        self.pending: dict[int, tuple[str, asyncio.Future[Message]]] = {}
        self.ids = itertools.count(1)
        self.next_id = 1
        self.send_lock = asyncio.Lock()
        self.connected_at = time.time()
        self.closed: str | None = None
        self.launched = False
        self.inflight = 0  # its requests being served
        # Requests encoded ahead of the freeze window, (op, session id) -> (id, frame).
        self.ready: dict[tuple[str, str], tuple[int, bytes]] = {}

    @property
    def label(self) -> str:
        return f"{self.app_id} (pid {self.cred.pid}, uid {self.cred.uid})"

    def new_id(self) -> int:
        """The next request id (replies to ids below `next_id` are late, not unknown)."""
        msg_id = next(self.ids)
        self.next_id = msg_id + 1
        return msg_id


class AppServer:
    """The RM's application socket: applications connect, register sessions and flows.

    `allowed_uids`: who may connect besides root, the RM's own user and the users configured
    for importers. `timeout`: how long an application has to answer a request. `importers`:
    session type -> how to launch an importer for it when none is connected.
    """

    def __init__(
        self,
        path: str,
        host: SessionHost,
        *,
        allowed_uids: set[int],
        timeout: float = 2.0,
        importers: dict[str, ImporterSpec] | None = None,
        launch_timeout: float = LAUNCH_TIMEOUT,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.path = path
        self.host = host
        self.timeout = timeout
        self.launch_timeout = launch_timeout
        self.limits = limits
        self.importers = dict(importers or {})
        self._allowed = set(allowed_uids) | {os.geteuid()}
        self._importer_users: dict[str, pwd.struct_passwd] = {}
        for stype, spec in self.importers.items():
            if not spec.command:
                raise ValueError(f"importer for session type {stype!r}: empty command")
            if spec.user is not None:
                try:
                    pw = pwd.getpwnam(spec.user)
                except KeyError:
                    raise ValueError(
                        f"importer for session type {stype!r}: no such user {spec.user!r}"
                    ) from None
                if pw.pw_uid == 0:
                    raise ValueError(
                        f"importer for session type {stype!r}: user {spec.user!r} is root;"
                        " importers are launched as an unprivileged user (or leave user unset)"
                    )
                self._importer_users[stype] = pw
                self._allowed.add(pw.pw_uid)
        self._lsock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: dict[str, _Conn] = {}  # by app_id (or conn#N before hello)
        self._serial = itertools.count(1)
        self._sessions: dict[str, _Owned] = {}
        self._prepared: dict[str, str] = {}  # session id -> importer holding its sockets
        self._tasks: set[asyncio.Task[Any]] = set()
        self._importer_waiters: dict[str, list[asyncio.Future[str]]] = {}
        self._launching: dict[str, asyncio.Task[str]] = {}
        self._launched: list[_Launch] = []
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen on `path` (a stale socket file left by a dead RM is replaced)."""
        self._loop = asyncio.get_running_loop()
        _remove_stale(self.path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            lsock.bind(self.path)
            # Access is decided by SO_PEERCRED; the file mode only has to let allowed users in.
            others = self._allowed - {0, os.geteuid()}
            os.chmod(self.path, 0o666 if others else 0o600)
            lsock.listen(64)
            lsock.setblocking(False)
        except OSError as e:
            lsock.close()
            raise AppError(f"cannot listen for applications on {self.path}: {e}") from e
        self._lsock = lsock
        self._loop.add_reader(lsock.fileno(), self._accept)
        _log.info("application socket %s", self.path)

    async def close(self) -> None:
        """Stop listening, drop every application, stop the importers this server launched."""
        self._closing = True
        if self._lsock is not None and self._loop is not None:
            self._loop.remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for conn in list(self._conns.values()):
            self._drop(conn, "the RM is shutting down")
        for task in list(self._launching.values()):
            task.cancel()
        for t in list(self._tasks):
            t.cancel()
        await self._stop_launched()

    async def _stop_launched(self) -> None:
        procs = [la.proc for la in self._launched if la.proc.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + 2.0
        for p in procs:
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        self._launched.clear()

    # -- queries -------------------------------------------------------------------------------

    def importer_for(self, session_type: str) -> str | None:
        """A connected application registered as importer for `session_type`, or None."""
        for conn in self._conns.values():
            if conn.helloed and conn.closed is None and session_type in conn.importer_types:
                return conn.app_id
        return None

    def apps(self) -> list[dict[str, Any]]:
        """Connected applications (JSON-able), for `sessmob device show` / `session show`."""
        self._reap()
        out = []
        for conn in self._conns.values():
            if not conn.helloed:
                continue
            out.append(
                {
                    "app": conn.app_id,
                    "name": conn.name,
                    "pid": conn.cred.pid,
                    "uid": conn.cred.uid,
                    "importer_types": list(conn.importer_types),
                    "sessions": sorted(
                        sid for sid, o in self._sessions.items() if o.app_id == conn.app_id
                    ),
                    "launched": conn.launched,
                    "connected_s": round(time.time() - conn.connected_at, 3),
                }
            )
        return out

    def is_connected(self, app_id: str) -> bool:
        conn = self._conns.get(app_id)
        return conn is not None and conn.helloed and conn.closed is None

    def session_app(self, session_id: str) -> str | None:
        """The application that runs `session_id` here, if any."""
        owned = self._sessions.get(session_id)
        return owned.app_id if owned is not None else None

    # -- importers -----------------------------------------------------------------------------

    async def ensure_importer(self, session_type: str) -> str:
        """A connected importer for `session_type`, launching the configured one if needed.

        Not for the freeze window (starting a process takes milliseconds): call it when the
        move is being prepared (ReserveResources). Raises AppError with the reason.
        """
        app_id = self.importer_for(session_type)
        if app_id is not None:
            return app_id
        if session_type not in self.importers:
            raise AppError(
                f"no application is registered as importer for session type {session_type!r}"
                f" and none is configured to be launched (add [importers.{session_type}] to"
                " the RM's config, or start one)"
            )
        task = self._launching.get(session_type)
        if task is None:
            task = asyncio.ensure_future(self._launch(session_type))
            self._launching[session_type] = task
            task.add_done_callback(lambda _t: self._launching.pop(session_type, None))
        return await asyncio.shield(task)

    async def _launch(self, session_type: str) -> str:
        spec = self.importers[session_type]
        env = dict(os.environ)
        kwargs: dict[str, Any] = {}
        pw = self._importer_users.get(session_type)
        if pw is not None:
            if pw.pw_uid != os.geteuid():  # switching needs privileges; staying does not
                kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        env.update(spec.env)
        env[ENV_SOCKET] = self.path
        env[ENV_IMPORT_TYPE] = session_type
        assert self._loop is not None
        waiter: asyncio.Future[str] = self._loop.create_future()
        self._importer_waiters.setdefault(session_type, []).append(waiter)
        try:
            try:
                proc = subprocess.Popen(
                    spec.command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=2,  # the importer's output goes to the RM's log (stderr)
                    start_new_session=True,
                    **kwargs,
                )
            except (OSError, subprocess.SubprocessError) as e:
                who = f" as user {spec.user}" if spec.user else ""
                raise AppError(
                    f"cannot launch the importer for session type {session_type!r}"
                    f" ({' '.join(spec.command)}){who}: {e}"
                ) from e
            launch = _Launch(session_type, proc, time.monotonic())
            self._launched.append(launch)
            _log.info("launched importer for %r: pid %d: %s", session_type, proc.pid,
                      " ".join(spec.command))  # fmt: skip
            deadline = time.monotonic() + self.launch_timeout
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=0.05)
                if done:
                    return waiter.result()
                rc = proc.poll()
                if rc is not None:
                    raise AppError(
                        f"the importer launched for session type {session_type!r}"
                        f" (pid {proc.pid}, {' '.join(spec.command)}) exited with status {rc}"
                        " before registering (its output is in the RM's log)"
                    )
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise AppError(
                        f"the importer launched for session type {session_type!r}"
                        f" (pid {proc.pid}) did not register within {self.launch_timeout:g} s;"
                        " killed it"
                    )
        finally:
            waiters = self._importer_waiters.get(session_type, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiter.done():
                waiter.cancel()

    def _reap(self) -> None:
        """Forget launched importers that have exited (and collect their exit status)."""
        self._launched = [la for la in self._launched if la.proc.poll() is None]

    # -- RM -> application ---------------------------------------------------------------------

    async def suspend(self, app_id: str, session_id: str) -> bytes:
        """Ask the application to stop using the session; returns its exported state."""
        return await (await self.start_suspend(app_id, session_id))

    async def start_suspend(self, app_id: str, session_id: str) -> Awaitable[bytes]:
        """Send the suspend request now; the returned awaitable gives the exported state."""
        owned = self._owned(app_id, session_id, "suspend")
        owned.phase = _Phase.SUSPENDED  # add/remove_flow are refused from now on
        answer = await self._send(app_id, "suspend", {"session_id": session_id}, session_id)

        async def state() -> bytes:
            return bytes((await answer)["state"])

        return state()

    async def prepare(
        self, app_id: str, session_id: str, session_type: str, flows: list[tuple[str, str, int]]
    ) -> None:
        """Hand an importer the sockets of a session it is about to import — (flow id, kind,
        fd) each, not yet restored — before the freeze: inside the window only the state
        then has to reach it (`start_import(..., prepared=True)`)."""
        fields = {
            "session_id": session_id,
            "session_type": session_type,
            "flows": [{"flow_id": fid, "kind": kind} for fid, kind, _ in flows],
        }
        await self._call(app_id, "prepare", fields, session_id, [fd for _, _, fd in flows])
        self._prepared[session_id] = app_id

    async def import_session(self, app_id: str, session: ServiceSession, state: bytes) -> None:
        """Hand an arriving session to an importer: its state and its (frozen) sockets."""
        flows = [(f.flow_id, str(f.kind)) for f in session.flows]
        addresses = [str(a) for a in session.addresses]
        await (await self.start_import(app_id, session, state, flows, addresses, prepared=False))

    async def start_import(
        self,
        app_id: str,
        session: ServiceSession,
        state: bytes,
        flows: list[tuple[str, str]],
        addresses: list[str],
        *,
        prepared: bool,
    ) -> Awaitable[dict[str, Any]]:
        """Send the import now; the returned awaitable gives the importer's answer.

        `prepared`: the importer already holds the sockets (prepare) — the RM may still be
        restoring them while the importer takes in the state. Otherwise the session's
        sockets (restored, frozen) go with the request, in the order of `flows`."""
        sid = session.session_id
        fds: list[int] = []
        if not prepared:
            socks = {f.flow_id: f.sock for f in session.flows}
            for fid, _ in flows:
                sock = socks.get(fid)
                if sock is None:
                    raise AppError(f"session {sid}: flow {fid} has no socket")
                fds.append(sock.fileno())
        fields: dict[str, Any] = {
            "session_id": sid,
            "session_type": session.session_type,
            "state": bytes(state),
            "addresses": addresses,
            "flows": [{"flow_id": fid, "kind": kind} for fid, kind in flows],
        }
        if prepared:
            fields["prepared"] = True
        prev = self._sessions.get(sid)
        if prev is not None and prev.phase != _Phase.IMPORTED:
            raise AppError(f"session {sid} already runs here in application {prev.app_id}")
        self._prepared.pop(sid, None)
        self._sessions[sid] = _Owned(app_id, session, _Phase.IMPORTED)
        return await self._send(app_id, "import", fields, sid, fds)

    async def discard_prepared(self, session_id: str) -> None:
        """The import prepared for `session_id` will not come: the importer drops the
        sockets it was given (a no-op if none were, or the import went ahead)."""
        for conn in self._conns.values():
            conn.ready.pop(("resume", session_id), None)  # preencoded for it, never sent
        app_id = self._prepared.pop(session_id, None)
        if app_id is not None and self.is_connected(app_id):
            await self._call(app_id, "shutdown", {"session_id": session_id}, session_id)

    async def resume(self, app_id: str, session_id: str) -> None:
        """Let the application use the session again (ED after a failed move; ID activation)."""
        await (await self.start_resume(app_id, session_id, wait_on_socket=True))

    async def start_resume(
        self, app_id: str, session_id: str, *, wait_on_socket: bool = False
    ) -> Awaitable[None]:
        """Send the resume request now; the returned awaitable ends with its acknowledgement."""
        owned = self._owned(app_id, session_id, "resume")
        answer = await self._send(
            app_id, "resume", {"session_id": session_id}, session_id, wait_on_socket=wait_on_socket
        )

        async def acknowledged() -> None:
            await answer
            owned.phase = _Phase.ACTIVE

        return acknowledged()

    async def shutdown(self, app_id: str, session_id: str) -> None:
        """The session left (ED) or its import was aborted (ID): the application closes its
        descriptors silently. A no-op if the application never had the session or is gone."""
        owned = self._sessions.get(session_id)
        if owned is None or owned.app_id != app_id:
            return
        del self._sessions[session_id]
        conn = self._conns.get(app_id)
        if conn is None or conn.closed is not None:
            return  # its descriptors went with it
        await self._call(app_id, "shutdown", {"session_id": session_id}, session_id)

    def preencode(self, app_id: str, op: str, session_id: str) -> None:
        """Encode the `op` request (suspend or resume) of a session now, before the freeze
        window: there the next one for that session then only has to be written. Encoding
        a small request costs tens of µs of Python that has just woken (docs/architecture.md,
        "Measured"); unused, it is replaced by the next preencode or dropped with the
        connection."""
        if op not in PREENCODED:
            raise ValueError(f"preencode: {op!r} is not one of {PREENCODED}")
        conn = self._conns.get(app_id)
        if conn is None or conn.closed is not None:
            return  # the request will fail when it is sent, with the reason
        msg_id = conn.new_id()
        fields = {"session_id": session_id}
        conn.ready[(op, session_id)] = (msg_id, encode_request(op, msg_id, fields, 0, self.limits))

    def _owned(self, app_id: str, session_id: str, what: str) -> _Owned:
        owned = self._sessions.get(session_id)
        if owned is None or owned.app_id != app_id:
            raise AppError(f"{what}: session {session_id} does not run in application {app_id}")
        return owned

    async def _call(
        self,
        app_id: str,
        op: str,
        fields: dict[str, Any],
        session_id: str,
        fds: list[int] | None = None,
    ) -> dict[str, Any]:
        pending = await self._send(app_id, op, fields, session_id, fds)
        return await pending

    async def _send(
        self,
        app_id: str,
        op: str,
        fields: dict[str, Any],
        session_id: str,
        fds: list[int] | None = None,
        *,
        wait_on_socket: bool = True,
    ) -> Awaitable[dict[str, Any]]:
        """Send a request now; the returned awaitable gives the application's answer.

        Sending does not pass through the event loop (the socket takes small frames at once),
        so a caller can do other work while the application handles the request. With
        `wait_on_socket`, awaiting the answer first reads the socket directly for a moment.
        """
        conn = self._conns.get(app_id)
        if conn is None or conn.closed is not None:
            why = conn.closed if conn is not None else "not connected"
            raise AppError(f"{op} of session {session_id}: application {app_id} is gone ({why})")
        fds = fds or []
        ready = conn.ready.pop((op, session_id), None)
        if ready is not None and not fds and fields == {"session_id": session_id}:
            msg_id, frame = ready
        else:
            msg_id = conn.new_id()
            try:
                frame = encode_request(op, msg_id, fields, len(fds), self.limits)
            except ProtocolError as e:
                raise AppError(f"{op} of session {session_id} for {conn.label}: {e}") from e
        assert self._loop is not None
        fut: asyncio.Future[Message] = self._loop.create_future()
        conn.pending[msg_id] = (op, fut)
        try:
            async with conn.send_lock:
                await send_frame_async(self._loop, conn.sock, frame, fds)
        except BaseException as e:
            conn.pending.pop(msg_id, None)
            if not isinstance(e, OSError):
                raise
            self._drop(conn, f"send failed: {e}")
            raise AppError(
                f"{op} of session {session_id}: sending to {conn.label} failed: {e}"
            ) from e
        return self._answer(conn, op, session_id, msg_id, fut, wait_on_socket)

    async def _answer(
        self,
        conn: _Conn,
        op: str,
        session_id: str,
        msg_id: int,
        fut: asyncio.Future[Message],
        wait_on_socket: bool,
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            # Inside a move the answer usually comes within a millisecond: wait for it on
            # the socket itself (a bounded stretch), not through another loop iteration.
            if wait_on_socket and not fut.done():
                self._wait_on_socket(conn, fut, min(self.timeout, SOCKET_WAIT))
            if fut.done():
                msg = fut.result()
            else:
                try:
                    async with asyncio.timeout(self.timeout - (time.monotonic() - t0)):
                        msg = await fut
                except TimeoutError:
                    raise AppError(
                        f"application {conn.label} did not answer {op} of session {session_id}"
                        f" within {self.timeout:g} s"
                    ) from None
        finally:
            conn.pending.pop(msg_id, None)
        if not msg.ok:
            raise AppError(f"application {conn.label} failed {op} of session {session_id}:"
                           f" {msg.error}")  # fmt: skip
        return {k: v for k, v in msg.body.items() if k != "ok"}  # validated by _dispatch

    def _wait_on_socket(self, conn: _Conn, fut: asyncio.Future[Message], limit: float) -> None:
        """Read `conn` synchronously until `fut` has its reply, the connection drops, or
        `limit` seconds pass. Whatever else arrives meanwhile is dispatched as usual."""
        deadline = time.monotonic() + limit
        while not fut.done() and conn.closed is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if conn.poller.poll(left * 1e3):
                self._readable(conn, until=fut)

    # -- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._lsock is not None and self._loop is not None
        while True:
            try:
                sock, _ = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                accept_failed(self._loop, self._lsock, self._accept, e, _log, self.path)
                return
            try:
                cred = peer_cred(sock)
            except OSError as e:
                _log.warning("application connection without credentials (%s); dropped", e)
                sock.close()
                continue
            if not uid_allowed(cred.uid, self._allowed):
                _log.warning("application pid %d uid %d refused: uid not allowed",
                             cred.pid, cred.uid)  # fmt: skip
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(
                        encode_reply(
                            0,
                            error=f"uid {cred.uid} may not use this RM (allowed: root and"
                            f" uids {sorted(self._allowed - {0})}; see allowed_uids in the"
                            " RM's config)",
                        )
                    )
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, cred, next(self._serial))
            conn.launched = any(la.proc.pid == cred.pid for la in self._launched)
            self._conns[conn.app_id] = conn
            self._loop.add_reader(sock.fileno(), self._readable, conn)
            self._loop.call_later(HELLO_TIMEOUT, self._hello_deadline, conn)

    def _hello_deadline(self, conn: _Conn) -> None:
        if not conn.helloed and conn.closed is None:
            self._drop(conn, f"no hello within {HELLO_TIMEOUT:g} s")

    def _readable(self, conn: _Conn, until: asyncio.Future[Message] | None = None) -> None:
        """Read and dispatch what `conn` has; with `until`, stop once that reply is in (the
        rest stays for the loop: inside the window no read that can only say EAGAIN)."""
        for _ in range(16):  # then let others run; the loop calls again if more is there
            if until is not None and until.done():
                return
            try:
                data, fds = recv_chunk(conn.sock, conn.rbuf)
            except (BlockingIOError, InterruptedError):
                return
            except ProtocolError as e:
                self._drop(conn, f"protocol error: {e}", error=True)
                return
            except OSError as e:
                self._drop(conn, "disconnected" if is_disconnect(e) else f"receive failed: {e}")
                return
            msgs: list[Message] = []
            try:
                if not data:
                    conn.decoder.eof()
                    self._drop(conn, "disconnected")
                    return
                msgs = conn.decoder.feed(data, fds)
                while msgs:
                    self._dispatch(conn, msgs.pop(0))
            except ProtocolError as e:
                for m in msgs:
                    m.close_fds()
                self._drop(conn, f"protocol error: {e}", error=True)
                return
            if conn.closed is not None:
                return

    def _dispatch(self, conn: _Conn, msg: Message) -> None:
        if msg.is_reply:
            entry = conn.pending.get(msg.id)
            if entry is None:
                if msg.id < conn.next_id:  # the request timed out; its answer came late
                    _log.warning("%s: late reply to request %d ignored", conn.label, msg.id)
                    return
                raise ProtocolError(f"reply to request {msg.id}, which was never sent")
            op, fut = entry
            if msg.ok:
                msg.result(op)  # a malformed result drops the connection (ProtocolError)
            if not fut.done():
                fut.set_result(msg)
            return
        if not conn.helloed:
            if msg.op != "hello":
                msg.close_fds()
                raise ProtocolError(f"first request must be hello, not {msg.op}")
            self._hello(conn, msg)
            return
        if msg.op == "hello":
            raise ProtocolError("second hello on one connection")
        if conn.inflight >= MAX_INFLIGHT:
            msg.close_fds()
            raise ProtocolError(f"more than {MAX_INFLIGHT} requests in flight")
        conn.inflight += 1
        self._spawn(self._serve(conn, msg))

    def _hello(self, conn: _Conn, msg: Message) -> None:
        body = msg.body
        if body["proto"] != PROTO_VERSION:
            self._spawn(
                self._reply_and_drop(
                    conn,
                    msg.id,
                    f"protocol version {body['proto']} not supported (this RM speaks"
                    f" {PROTO_VERSION}); update sessmob on one side",
                )
            )
            return
        del self._conns[conn.app_id]
        conn.name = body["name"]
        conn.app_id = f"{conn.name}#{conn.serial}"
        conn.importer_types = list(dict.fromkeys(body["importer_types"]))
        conn.helloed = True
        self._conns[conn.app_id] = conn
        if body["pid"] != conn.cred.pid:
            _log.info("%s says it is pid %d", conn.label, body["pid"])
        _log.info("application %s connected; importer for %s", conn.label,
                  conn.importer_types or "nothing")  # fmt: skip
        result = {
            "app_id": conn.app_id,
            "proto": PROTO_VERSION,
            "max_frame": self.limits.max_frame,
            "max_fds": self.limits.max_fds,
        }
        self._spawn(self._reply(conn, msg.id, result))
        for stype in conn.importer_types:
            for waiter in self._importer_waiters.pop(stype, []):
                if not waiter.done():
                    waiter.set_result(conn.app_id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(
        self, conn: _Conn, msg_id: int, result: dict[str, Any] | None, error: str | None = None
    ) -> None:
        if conn.closed is not None:
            return
        frame = encode_reply(msg_id, result, error=error, limits=self.limits)
        assert self._loop is not None
        try:
            async with conn.send_lock:
                await send_frame_async(self._loop, conn.sock, frame)
        except OSError as e:
            self._drop(conn, f"send failed: {e}")

    async def _reply_and_drop(self, conn: _Conn, msg_id: int, error: str) -> None:
        await self._reply(conn, msg_id, None, error)
        self._drop(conn, error, error=True)

    async def _serve(self, conn: _Conn, msg: Message) -> None:
        try:
            await self._serve_one(conn, msg)
        finally:
            conn.inflight -= 1

    async def _serve_one(self, conn: _Conn, msg: Message) -> None:
        try:
            result = await self._handle(conn, msg)
        except asyncio.CancelledError:
            msg.close_fds()
            raise
        except Exception as e:
            msg.close_fds()
            text = str(e) if isinstance(e, AppError) else f"{type(e).__name__}: {e}"
            _log.warning("%s: %s refused: %s", conn.label, msg.op, text)
            await self._reply(conn, msg.id, None, text)
            return
        await self._reply(conn, msg.id, result)

    async def _handle(self, conn: _Conn, msg: Message) -> dict[str, Any]:
        body = msg.body
        op = msg.op
        if op == "create_session":
            session = await self.host.create_session(conn.app_id, body["session_type"])
            session.app_id = conn.app_id
            self._sessions[session.session_id] = _Owned(conn.app_id, session)
            return {
                "session_id": session.session_id,
                "addresses": [str(a) for a in session.addresses],
            }
        sid = body["session_id"]
        owned = self._sessions.get(sid)
        if owned is None or owned.app_id != conn.app_id:
            raise AppError(f"session {sid!r} does not belong to {conn.app_id}")
        if owned.phase != _Phase.ACTIVE:
            raise AppError(f"session {sid} is being moved ({owned.phase}); retry after resume")
        if op == "add_flow":
            sock = _flow_socket(msg)
            try:
                flow = await self.host.add_flow(sid, sock, body.get("flow_id"))
            except BaseException:
                sock.close()
                raise
            return {"flow_id": flow.flow_id}
        if op == "remove_flow":
            await self._remove_flow(owned, body["flow_id"])
            return {}
        if op == "close_session":
            await self.host.close_session(sid)
            self._sessions.pop(sid, None)
            return {}
        raise ProtocolError(f"unhandled operation {op!r}")  # the decoder admits no other

    async def _remove_flow(self, owned: _Owned, flow_id: str) -> None:
        session = owned.session
        remover = getattr(self.host, "remove_flow", None)
        if remover is not None:
            await remover(session.session_id, flow_id)
            return
        flow = session.flow(flow_id)  # KeyError names the flow
        session.flows.remove(flow)
        if flow.sock is not None:
            flow.sock.close()
            flow.sock = None

    def _drop(self, conn: _Conn, reason: str, *, error: bool = False) -> None:
        """Forget a connection: fail its pending requests, end its active sessions."""
        if conn.closed is not None:
            return
        conn.closed = reason
        (_log.error if error else _log.info)("application %s: %s; connection dropped",
                                             conn.label, reason)  # fmt: skip
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(conn.sock.fileno())
        conn.sock.close()
        conn.decoder.close()
        if self._conns.get(conn.app_id) is conn:
            del self._conns[conn.app_id]
        for _op, fut in conn.pending.values():
            if not fut.done():
                fut.set_exception(AppError(f"application {conn.label} is gone ({reason})"))
        self._reap()  # a launched importer that went away leaves no zombie
        if self._closing:
            return
        for sid, owned in list(self._sessions.items()):
            if owned.app_id != conn.app_id:
                continue
            if owned.phase == _Phase.ACTIVE:
                # Nobody will use it again; keeping the RM's duplicates would keep the
                # connections open with no one reading them.
                del self._sessions[sid]
                self._spawn(self._close_orphan(sid, conn.label))
            # Sessions inside a move are left to the move: resume fails (AppError) and the
            # RM decides; shutdown is a no-op.

    async def _close_orphan(self, session_id: str, label: str) -> None:
        try:
            await self.host.close_session(session_id)
            _log.info("session %s closed: its application %s is gone", session_id, label)
        except Exception as e:
            _log.error("closing session %s of vanished application %s failed: %s",
                       session_id, label, e)  # fmt: skip


def _flow_socket(msg: Message) -> socket.socket:
    """The socket that came with add_flow, checked to be TCP or UDP over IPv4/IPv6."""
    fd = msg.fds.pop()
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise AppError("add_flow: the descriptor is not a socket")
        sock = socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    ok = sock.family in (socket.AF_INET, socket.AF_INET6) and (
        (sock.type == socket.SOCK_STREAM and sock.proto in (0, socket.IPPROTO_TCP))
        or (sock.type == socket.SOCK_DGRAM and sock.proto in (0, socket.IPPROTO_UDP))
    )
    if not ok:
        desc = f"family {sock.family!s}, type {sock.type!s}, protocol {sock.proto}"
        sock.close()
        raise AppError(f"add_flow: not a TCP or UDP socket over IPv4/IPv6 ({desc})")
    return sock


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse if an RM is still serving there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AppError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:  # nobody listening: left behind by an RM that died
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AppError(f"another process already serves applications on {path}")


class ApplicationAdapter:
    """Interface A for the application part of a session (see sessmob.adapters.base)."""

    name = "application"

    def __init__(self, server: AppServer) -> None:
        self.server = server
        self._reserved: dict[str, str] = {}  # session id -> importer chosen at reservation

    async def get_resources(self, session: ServiceSession) -> dict[str, Any]:
        # state_hint: size of the last exported state (0 before the first move): a sizing hint.
        return {"session_type": session.session_type, "state_hint": len(session.app_state)}

    async def reserve_resources(self, offer: TransferOffer) -> None:
        need = offer.resources.get(self.name, {})
        stype = need.get("session_type") or offer.session_type
        try:
            self._reserved[offer.session_id] = await self.server.ensure_importer(stype)
        except AppError as e:
            raise Refused(
                self.name, f"no importer for session type {stype!r} on this device: {e}"
            ) from e

    async def release_resources(self, offer: TransferOffer) -> None:
        self._reserved.pop(offer.session_id, None)
        await self.server.discard_prepared(offer.session_id)

    async def do_presignaling(self, session: ServiceSession, role: Role) -> None:
        """Before the freeze (ED): the suspend request is encoded now, only sent inside."""
        if role is Role.EXPORT and session.app_id is not None:
            self.server.preencode(session.app_id, "suspend", session.session_id)

    async def suspend(self, session: ServiceSession) -> None:
        await (await self.start_suspend(session))

    async def start_suspend(self, session: ServiceSession) -> Awaitable[None]:
        """Suspend, split: the request goes out now, the awaitable waits for the state (so
        the RM can isolate the session while the application parks)."""
        answer = await self.server.start_suspend(_app(session), session.session_id)

        async def parked() -> None:
            session.app_state = await answer

        return parked()

    async def get_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:

        doc.apps.append(AppState(session.session_type, session.app_state))

    async def set_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:
        flows = [(f.flow_id, str(f.kind)) for f in session.flows]
        await (await self.start_set_state(session, doc, flows, prepared=False))

    async def prepare(self, offer: TransferOffer, flows: list[tuple[str, str, int]]) -> None:
        """Hand the reserved importer the session's sockets ahead of the state (see
        AppServer.prepare); AppError if there is none or it refuses."""
        app_id = self._reserved.get(offer.session_id)
        if app_id is None:
            raise AppError(f"session {offer.session_id}: no importer reserved")
        await self.server.prepare(app_id, offer.session_id, offer.session_type, flows)
        self.server.preencode(app_id, "resume", offer.session_id)  # sent after activation

    async def start_set_state(
        self,
        session: ServiceSession,
        doc: ExchangeDoc,
        flows: list[tuple[str, str]],
        *,
        prepared: bool,
    ) -> Awaitable[object]:
        """SetState, split: the state goes to the importer now, the awaitable waits for its
        answer. `prepared`: the importer holds the sockets already (the transports may still
        be restoring them); otherwise the session's restored sockets go with the state."""
        blob = next((a.blob for a in doc.apps if a.app_type == session.session_type), None)
        if blob is None:
            raise AppError(
                f"session {session.session_id}: the exchange document carries no application"
                f" state of type {session.session_type!r}"
            )
        app_id = self._reserved.pop(session.session_id, None)
        if prepared and app_id is None:
            raise AppError(f"session {session.session_id}: prepared, but no importer reserved")
        if app_id is None or not self.server.is_connected(app_id):
            # The reserved importer went away: take another connected one (never launch here,
            # this is the freeze window). Prepared sockets are with the one that went away.
            if prepared:
                raise AppError(f"session {session.session_id}: the prepared importer is gone")
            app_id = self.server.importer_for(session.session_type)
        if app_id is None:
            raise AppError(
                f"session {session.session_id}: no importer for session type"
                f" {session.session_type!r} is connected any more"
            )
        answer = await self.server.start_import(
            app_id, session, blob, flows, list(doc.addresses), prepared=prepared
        )
        session.app_id = app_id
        session.app_state = blob
        return answer

    async def resume(self, session: ServiceSession, role: Role) -> None:
        await self.server.resume(_app(session), session.session_id)

    async def start_resume(self, session: ServiceSession) -> Awaitable[None]:
        """Resume, split: the request goes out now; the awaitable ends with the application's
        acknowledgement (the importing RM does not hold its reply for it)."""
        return await self.server.start_resume(_app(session), session.session_id)

    async def do_postsignaling(self, session: ServiceSession, role: Role) -> None:
        return None

    async def shutdown(self, session: ServiceSession, role: Role) -> None:
        app_id = session.app_id or self.server.session_app(session.session_id)
        if app_id is not None:
            await self.server.shutdown(app_id, session.session_id)


def _app(session: ServiceSession) -> str:
    if session.app_id is None:
        raise AppError(f"session {session.session_id} has no application on this device")
    return session.app_id
