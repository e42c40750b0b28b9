"""The echo application (the paper's demo): a migratable echo server and a verifying client.

    python -m sessmob.apps.echo serve  --rm-socket PATH [--port 7000] [--import-only] [--json]
    python -m sessmob.apps.echo client --connect ADDR PORT [--rate B/S] [--duration S]
                                       [--tcp N] [--udp N] [--json]

`serve` connects to the local Relocation Manager, registers as importer for session type "echo",
creates one echo session (the RM gives it its own address), listens on the wildcard address
(dual-stack [::]:PORT, so the listener does not occupy the session address) and makes every
accepted connection whose local address is a session address a flow of that session; a UDP
socket bound to the session address and PORT echoes datagrams and is a flow too. Connections to
other addresses are echoed as well, but cannot move. With --import-only it creates no session
of its own and only takes over sessions that arrive from other devices.

Each session's flows are served by one thread (non-blocking sockets, epoll, an eventfd to wake
it) that parks on suspend. The state blob carries, per flow, the bytes echoed so far and the
bytes read but not yet echoed — so nothing the client sent is lost across a move.

`client` sends a verifiable pattern on each TCP connection (netns_testbed.stream), checks that
every echoed byte comes back correct and in order, and reports totals, the longest gap and
errors; UDP flows send numbered datagrams and count the lost, duplicated and corrupted ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from sessmob.appkit import AppKit, AppKitError, ImportedFlow, SessionHandle
from sessmob.hotpath import settle

SESSION_TYPE = "echo"
DEFAULT_PORT = 7000
STATE_VERSION = 1

_RECV = 64 * 1024
_MAX_PENDING = 1 << 20  # bytes read but not echoed yet, per TCP flow (then stop reading)
_MAX_DGRAMS = 1024  # datagrams waiting to be echoed, per UDP flow (then drop)
_PARK_TIMEOUT = 1.0

_log = logging.getLogger("sessmob.echo")


class EchoError(RuntimeError):
    """The echo server cannot do what was asked (the message says why)."""


# ---------------------------------------------------------------------------------------------
# server


@dataclass(eq=False)
class EchoFlow:
    """One echoed socket and its state (what moves with it)."""

    flow_id: str | None  # None: not part of a session (cannot move)
    kind: str  # "tcp" | "udp"
    sock: socket.socket
    echoed: int = 0  # bytes sent back
    pending: bytearray = field(default_factory=bytearray)  # TCP: read, not yet echoed
    dgrams: deque[tuple[bytes, tuple[str, int]]] = field(default_factory=deque)  # UDP
    eof: bool = False  # TCP: the peer sent FIN
    shut: bool = False  # TCP: our FIN went out (after the last byte)
    dropped: int = 0  # UDP: datagrams dropped because too many were waiting
    mask: int = 0  # selector events registered

    def export(self) -> dict[str, Any]:
        st: dict[str, Any] = {"kind": self.kind, "echoed": self.echoed}
        if self.kind == "tcp":
            st.update(pending=bytes(self.pending), eof=self.eof, shut=self.shut)
        else:
            st.update(pending=[[d, a[0], a[1]] for d, a in self.dgrams], dropped=self.dropped)
        return st

    @classmethod
    def adopt(cls, flow_id: str, kind: str, sock: socket.socket, st: Any) -> EchoFlow:
        """A flow of an imported session, from its entry in the state blob (None: fresh)."""
        f = cls(flow_id, kind, sock)
        if st is None:
            return f
        try:
            if st["kind"] != kind:
                raise EchoError(f"flow {flow_id}: state says {st['kind']}, socket is {kind}")
            f.echoed = int(st["echoed"])
            if kind == "tcp":
                f.pending = bytearray(st["pending"])
                f.eof, f.shut = bool(st["eof"]), bool(st["shut"])
            else:
                f.dgrams = deque((bytes(d), (str(h), int(p))) for d, h, p in st["pending"])
                f.dropped = int(st["dropped"])
        except (KeyError, TypeError, ValueError) as e:
            raise EchoError(f"flow {flow_id}: malformed echo state ({e!r})") from e
        return f

    @property
    def finished(self) -> bool:
        return self.kind == "tcp" and self.shut


class EchoSession:
    """The flows of one session, served by one worker thread that can be parked.

    Thread-safe control: add(), pause(), resume(), stop(). export() needs a parked (or not
    yet started) session. `on_finished(session, flow)` is called (from the worker) when a TCP
    flow has ended both ways; the owner takes it out of the RM's session and then calls
    forget(flow).
    """

    def __init__(
        self,
        session_id: str | None,
        *,
        on_finished: Callable[[EchoSession, EchoFlow], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.on_finished = on_finished
        self.flows: list[EchoFlow] = []  # the worker's (only it changes the list while running)
        self.finished: list[EchoFlow] = []  # ended, waiting to leave the RM's session
        self._new: deque[EchoFlow] = deque()
        self._cv = threading.Condition()
        self._io = threading.Lock()  # held by the worker while it touches sockets
        self._pause_req = False
        self._parked = False
        self._stop_req = False
        self._thread: threading.Thread | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.error: str | None = None

    @property
    def name(self) -> str:
        return self.session_id or "local"

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def stopped(self) -> bool:
        return self._stop_req

    def start(self) -> None:
        with self._cv:
            if self._thread is not None or self._stop_req:
                return
            self._thread = threading.Thread(target=self._run, name=f"echo-{self.name}", daemon=True)
            self._thread.start()

    def add(self, flow: EchoFlow) -> None:
        """Serve another flow (from any thread; a parked session picks it up on resume)."""
        with self._cv:
            if self._stop_req:
                raise EchoError(f"session {self.name} is stopped")
            self._new.append(flow)
        self._poke()

    def start_parked(self) -> None:
        """Start the worker parked, ahead of an import: resume() then only lets it go, and
        no thread is started inside the freeze window."""
        with self._cv:
            self._pause_req = True
        self.start()

    def pause(self, timeout: float = _PARK_TIMEOUT) -> None:
        """Stop the worker from touching any socket; returns as soon as that holds.

        The worker touches sockets only while holding the I/O lock, and checks the pause flag
        each time it takes it. So setting the flag and passing through the lock once is enough.
        A worker idle in epoll is not woken: it would take the CPU (and the GIL) from the
        suspend inside the freeze window. It parks at its next wake-up — stop() and resume()
        wake it; until then its epoll holds the sockets, which are frozen or resumed as they
        are, never replaced.
        """
        with self._cv:
            self._pause_req = True
        if not self._io.acquire(timeout=timeout):
            raise EchoError(f"echo session {self.name} did not pause within {timeout:g} s")
        self._io.release()

    def resume(self) -> None:
        """Continue after pause(), or start serving an imported session."""
        with self._cv:
            self._pause_req = False
            self._cv.notify_all()
        self.start()

    def export(self) -> bytes:
        """The state blob (only while parked or not started)."""
        with self._cv:
            if self._alive() and not self._pause_req:
                raise EchoError(f"echo session {self.name} exported while running")
            flows = [*self.flows, *self._new]
            state = {f.flow_id: f.export() for f in flows if f.flow_id is not None}
            for f in self.finished:
                if f.flow_id is not None:
                    state[f.flow_id] = f.export()
        return msgpack.packb({"v": STATE_VERSION, "flows": state}, use_bin_type=True)

    def forget(self, flow: EchoFlow) -> None:
        """Close a finished flow (after the RM let go of it)."""
        with self._cv:
            if flow in self.finished:
                self.finished.remove(flow)
        flow.sock.close()

    def stop(self) -> None:
        """Stop the worker and close every socket (silent if the RM froze them)."""
        with self._cv:
            self._stop_req = True
            self._cv.notify_all()
        self._poke()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5.0)
        with self._cv:
            flows = [*self.flows, *self._new, *self.finished]
            self.flows, self.finished = [], []
            self._new.clear()
        for f in flows:
            f.sock.close()
        if t is None or not t.is_alive():
            with contextlib.suppress(OSError):
                os.close(self._wake)

    def stats(self) -> dict[str, Any]:
        with self._cv:
            flows = [*self.flows, *self._new, *self.finished]
        return {
            "session": self.session_id,
            "flows": {f.flow_id or f"local{i}": f.echoed for i, f in enumerate(flows)},
            "parked": self._parked,
        }

    # -- worker ----------------------------------------------------------------------------

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        sel: selectors.BaseSelector | None = None
        io = self._io
        try:
            while True:
                with self._cv:
                    if self._stop_req:
                        return
                    if self._pause_req:
                        if sel is not None:
                            sel.close()  # the flows may come back as other sockets
                            sel = None
                        self._parked = True
                        self._cv.notify_all()
                        self._cv.wait_for(lambda: not self._pause_req or self._stop_req)
                        self._parked = False
                        continue
                with io:  # every socket operation happens under the I/O lock, unpaused
                    if self._pause_req or self._stop_req:
                        continue
                    with self._cv:
                        new = list(self._new)
                        self._new.clear()
                    if sel is None:
                        sel = selectors.DefaultSelector()
                        sel.register(self._wake, selectors.EVENT_READ, None)
                        for f in list(self.flows):
                            f.mask = 0
                            self._arm(sel, f)
                    for f in new:
                        f.sock.setblocking(False)
                        f.mask = 0
                        self.flows.append(f)
                        self._arm(sel, f)
                events = sel.select()
                with io:
                    if self._pause_req or self._stop_req:
                        continue
                    for key, ev in events:
                        if key.data is None:
                            with contextlib.suppress(BlockingIOError):
                                os.eventfd_read(self._wake)
                        else:
                            self._service(sel, key.data, ev)
        except BaseException as e:  # a worker must not die silently
            self.error = f"echo worker of session {self.name} crashed: {e!r}"
            _log.exception("echo worker of session %s crashed", self.name)
        finally:
            if sel is not None:
                sel.close()
            with self._cv:
                self._parked = False
                self._cv.notify_all()

    def _arm(self, sel: selectors.BaseSelector, f: EchoFlow) -> None:
        """(Re-)register f for what it waits for; a finished flow leaves the worker."""
        if f.kind == "tcp":
            if f.eof and not f.pending and not f.shut:
                try:
                    f.sock.shutdown(socket.SHUT_WR)
                except OSError as e:
                    _log.info("session %s flow %s: shutdown: %s", self.name, f.flow_id, e)
                f.shut = True
            want = (selectors.EVENT_READ if not f.eof and len(f.pending) < _MAX_PENDING else 0) | (
                selectors.EVENT_WRITE if f.pending else 0
            )
        else:
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if f.dgrams else 0)
        if want != f.mask:
            if f.mask == 0:
                sel.register(f.sock, want, f)
            elif want == 0:
                sel.unregister(f.sock)
            else:
                sel.modify(f.sock, want, f)
            f.mask = want
        if f.finished:
            self._finish(sel, f)

    def _finish(self, sel: selectors.BaseSelector, f: EchoFlow) -> None:
        if f.mask:
            sel.unregister(f.sock)
            f.mask = 0
        self.flows.remove(f)
        if f.flow_id is None or self.on_finished is None:
            f.sock.close()
            return
        with self._cv:
            self.finished.append(f)
        self.on_finished(self, f)

    def _failed(self, sel: selectors.BaseSelector, f: EchoFlow, op: str, e: OSError) -> None:
        _log.warning("session %s flow %s: %s failed: %s", self.name, f.flow_id, op, e)
        f.eof, f.shut = True, True
        f.pending.clear()
        self._finish(sel, f)

    def _service(self, sel: selectors.BaseSelector, f: EchoFlow, ev: int) -> None:
        sock = f.sock
        if f.kind == "udp":
            if ev & selectors.EVENT_READ:
                for _ in range(64):
                    try:
                        data, addr = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:  # ICMP errors on connected sockets: keep going
                        _log.info("session %s flow %s: recvfrom: %s", self.name, f.flow_id, e)
                        break
                    if len(f.dgrams) < _MAX_DGRAMS:
                        f.dgrams.append((data, addr[:2]))
                    else:
                        f.dropped += 1
            while f.dgrams:
                data, addr = f.dgrams[0]
                try:
                    sock.sendto(data, addr)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    _log.info("session %s flow %s: sendto %s: %s", self.name, f.flow_id, addr, e)
                f.dgrams.popleft()
                f.echoed += len(data)
            self._arm(sel, f)
            return
        if ev & selectors.EVENT_READ:
            try:
                data = sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._failed(sel, f, "recv", e)
                return
            else:
                if data:
                    f.pending += data
                else:
                    f.eof = True
        if f.pending:
            try:
                n = sock.send(f.pending)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._failed(sel, f, "send", e)
                return
            else:
                f.echoed += n
                del f.pending[:n]
        self._arm(sel, f)


def _parse_state(state: bytes) -> dict[str, Any]:
    if not state:
        return {}
    try:
        obj = msgpack.unpackb(state, raw=False, strict_map_key=False)
    except Exception as e:
        raise EchoError(f"echo state blob is not valid msgpack: {e}") from e
    if not isinstance(obj, dict) or obj.get("v") != STATE_VERSION:
        raise EchoError(f"echo state blob of an unknown version: {obj.get('v')!r}"
                        if isinstance(obj, dict) else "echo state blob is not a map")  # fmt: skip
    flows = obj.get("flows")
    if not isinstance(flows, dict):
        raise EchoError("echo state blob has no flow map")
    return flows


def _dual_stack_listener(port: int, host: str = "::") -> socket.socket:
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind((host, port))
        ls.listen(128)
    except OSError:
        ls.close()
        raise
    return ls


class EchoServer:
    """The migratable echo server (one process: one kit, one listener, its sessions)."""

    def __init__(
        self,
        rm_socket: str | None,
        port: int = DEFAULT_PORT,
        *,
        create_session: bool = True,
        name: str = "echo",
        timeout: float = 2.0,
        udp: bool = True,
    ) -> None:
        self.rm_socket = rm_socket
        self.port = port
        self.create = create_session
        self.udp = udp
        self.name = name
        self.timeout = timeout
        self.kit: AppKit | None = None
        self.session: SessionHandle | None = None  # the one this process created
        self.sessions: dict[str, EchoSession] = {}
        self.local = EchoSession(None)  # connections to other addresses: echoed, never moved
        self._spare: EchoSession | None = None  # a parked worker for the next import
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopping = False
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._listener = _dual_stack_listener(self.port)
        except OSError as e:
            if self.create:
                raise EchoError(f"cannot listen on [::]:{self.port}: {e}") from e
            _log.warning("no listener on [::]:%d (%s): only moved connections are served",
                         self.port, e)  # fmt: skip
        self.kit = AppKit.connect(
            self.rm_socket,
            self.name,
            importer_types=[SESSION_TYPE],
            on_suspend=self._on_suspend,
            on_prepare=self._on_prepare,
            on_import=self._on_import,
            on_resume=self._on_resume,
            on_shutdown=self._on_shutdown,
            timeout=self.timeout,
        )
        try:
            if self.create:
                self.session = self.kit.create_session(SESSION_TYPE)
                es = self._new_session(self.session.session_id)
                es.start()
                if self.udp:
                    self._add_udp(self.session, es)
            self.local.start()
            self._spawn(self._worker, "echo-kit")
            if self._listener is not None:
                self._spawn(self._accept_loop, "echo-accept")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close the listener and every session's sockets, then leave the RM."""
        self._stopping = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            self._listener.close()
        self._jobs.put(None)
        with self._lock:
            sessions = list(self.sessions.values())
            self.sessions.clear()
            spare, self._spare = self._spare, None
        for es in [*sessions, self.local, *([spare] if spare else [])]:
            es.stop()
        if self.kit is not None:
            self.kit.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5.0)

    def ready_info(self) -> dict[str, Any]:
        return {
            "app": self.kit.app_id if self.kit else None,
            "session": self.session.session_id if self.session else None,
            "addresses": list(self.session.addresses) if self.session else [],
            "port": self.port,
            "listening": self._listener is not None,
            "pid": os.getpid(),
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            sessions = list(self.sessions.values())
        return {"sessions": [es.stats() for es in sessions], "local": self.local.stats()}

    # -- helpers ---------------------------------------------------------------------------

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _new_session(self, session_id: str) -> EchoSession:
        es = EchoSession(session_id, on_finished=self._flow_finished)
        with self._lock:
            self.sessions[session_id] = es
        return es

    def _session(self, session_id: str) -> EchoSession:
        with self._lock:
            es = self.sessions.get(session_id)
        if es is None:
            raise EchoError(f"no echo session {session_id!r} here")
        return es

    def _add_udp(self, handle: SessionHandle, es: EchoSession) -> None:
        assert self.kit is not None
        addr = handle.address
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        us = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            us.bind((addr, self.port))
            fid = self.kit.add_flow(handle.session_id, us)
        except (OSError, AppKitError) as e:
            us.close()
            raise EchoError(f"UDP echo on [{addr}]:{self.port}: {e}") from e
        es.add(EchoFlow(fid, "udp", us))

    def _accept_loop(self) -> None:
        assert self._listener is not None and self.kit is not None
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError as e:
                if self._stopping:
                    return
                _log.warning("accept: %s", e)
                time.sleep(0.05)
                continue
            local = conn.getsockname()[0]
            target = None
            for handle in self.kit.sessions():
                if handle.owns(local):
                    target = handle.session_id
                    break
            if target is not None:
                try:
                    fid = self.kit.add_flow(target, conn)
                    self._session(target).add(EchoFlow(fid, "tcp", conn))
                    continue
                except (AppKitError, EchoError) as e:
                    _log.warning("connection to %s not added to session %s (%s): echoed, but it"
                                 " cannot move", local, target, e)  # fmt: skip
            with contextlib.suppress(EchoError):
                self.local.add(EchoFlow(None, "tcp", conn))

    def _worker(self) -> None:
        """Runs AppKit requests that must not come from the kit's callbacks."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                _log.exception("echo: background job failed")

    def _flow_finished(self, es: EchoSession, flow: EchoFlow) -> None:
        self._jobs.put(lambda: self._remove_flow(es, flow))

    def _remove_flow(self, es: EchoSession, flow: EchoFlow) -> None:
        kit = self.kit
        assert kit is not None and es.session_id is not None and flow.flow_id is not None
        deadline = time.monotonic() + 10.0
        while not es.stopped and kit.connected:
            try:
                kit.remove_flow(es.session_id, flow.flow_id)
                break
            except AppKitError as e:  # e.g. the session is being moved: try again later
                if time.monotonic() > deadline:
                    _log.warning("flow %s stays in session %s: %s", flow.flow_id,
                                 es.session_id, e)  # fmt: skip
                    break
                time.sleep(0.05)
        if not es.stopped:
            es.forget(flow)

    # -- AppKit callbacks (on the kit's thread: quick, no kit requests) ---------------------

    def _on_suspend(self, session_id: str) -> bytes:
        es = self._session(session_id)
        es.pause()
        return es.export()

    def _on_prepare(self, session_id: str, session_type: str) -> None:
        # Before the freeze: the worker thread of the session that may arrive starts now,
        # parked, so that neither the import nor the resume start a thread.
        if session_type != SESSION_TYPE:
            raise EchoError(f"cannot import a session of type {session_type!r}")
        with self._lock:
            if self._spare is not None or self._stopping:
                return
        spare = EchoSession(None, on_finished=self._flow_finished)
        spare.start_parked()  # outside the lock: starting a thread takes a while
        with self._lock:
            keep = self._spare is None and not self._stopping
            if keep:
                self._spare = spare
        if not keep:  # stopping meanwhile
            spare.stop()

    def _on_import(
        self, session_id: str, session_type: str, state: bytes, flows: list[ImportedFlow]
    ) -> None:
        if session_type != SESSION_TYPE:
            raise EchoError(f"cannot import a session of type {session_type!r}")
        with self._lock:
            if session_id in self.sessions:
                raise EchoError(f"session {session_id} already runs here")
        saved = _parse_state(state)
        with self._lock:
            es, self._spare = self._spare, None
        if es is None:  # not prepared (the plain import): its worker starts at resume
            es = EchoSession(None, on_finished=self._flow_finished)
        es.session_id = session_id
        try:
            for flow_id, kind, sock in flows:
                f = EchoFlow.adopt(flow_id, kind, sock, saved.get(flow_id))
                if f.finished:
                    es.finished.append(f)
                else:
                    es.add(f)
        except BaseException:
            es.stop()  # its worker, if prepared (the kit closes the sockets)
            raise
        with self._lock:
            self.sessions[session_id] = es
        # Logged at debug level only: this runs inside the migration's freeze window.
        _log.debug("session %s imported with %d flow(s); waiting for resume", session_id,
                   len(flows))  # fmt: skip

    def _on_resume(self, session_id: str) -> None:
        es = self._session(session_id)
        es.resume()
        for f in list(es.finished):  # ended before the move: take them out now
            self._flow_finished(es, f)

    def _on_shutdown(self, session_id: str) -> None:
        with self._lock:
            es = self.sessions.pop(session_id, None)
        if es is not None:
            es.stop()
            _log.info("session %s left this device", session_id)
        if self.session is not None and self.session.session_id == session_id:
            self.session = None


# ---------------------------------------------------------------------------------------------
# client

_UDP_HDR = struct.Struct("!QQ")  # sequence number, send time (ns)


class UdpProbe:
    """Numbered datagrams to the echo server at a fixed rate; counts what comes back."""

    def __init__(self, host: str, port: int, *, pps: float, size: int, seed: int) -> None:
        if size < _UDP_HDR.size or size > 65507:
            raise ValueError(f"datagram size {size}: must be {_UDP_HDR.size}..65507")
        if pps <= 0:
            raise ValueError(f"datagram rate {pps}/s: must be > 0")
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self.sock.connect(info[4])
        self.sock.setblocking(False)
        self.pps, self.size, self.seed = pps, size, seed
        self.sent = self.received = self.duplicates = self.corrupt = self.reordered = 0
        self.max_gap = 0.0
        self._seen = bytearray()
        self._highest = -1
        self._stop_tx = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-udp", daemon=True)

    def _payload(self, seq: int) -> bytes:
        from netns_testbed.stream import pattern_bytes

        return pattern_bytes(self.seed, seq * 7919, self.size - _UDP_HDR.size)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 0.5) -> dict[str, Any]:
        self._stop_tx.set()
        time.sleep(grace)
        self._stop.set()
        self._thread.join(5.0)
        self.sock.close()
        return {
            "sent": self.sent,
            "received": self.received,
            "lost": self.sent - self.received,
            "duplicates": self.duplicates,
            "corrupt": self.corrupt,
            "reordered": self.reordered,
            "max_gap_ms": round(self.max_gap * 1000, 3),
        }

    def _run(self) -> None:
        interval = 1.0 / self.pps
        t_next = time.monotonic()
        last_rx = t_next
        while not self._stop.is_set():
            now = time.monotonic()
            if not self._stop_tx.is_set() and now >= t_next:
                seq = self.sent
                pkt = _UDP_HDR.pack(seq, time.monotonic_ns()) + self._payload(seq)
                with contextlib.suppress(OSError):  # e.g. ECONNREFUSED from an earlier ICMP
                    self.sock.send(pkt)
                self.sent += 1
                t_next += interval
                if t_next < now - 1.0:  # fell far behind: do not burst
                    t_next = now + interval
            timeout = max(0.0, min(t_next - now, 0.05))
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                continue
            while True:
                try:
                    data = self.sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                now = time.monotonic()
                self.max_gap = max(self.max_gap, now - last_rx)
                last_rx = now
                self._check(data)

    def _check(self, data: bytes) -> None:
        if len(data) != self.size:
            self.corrupt += 1
            return
        seq, _ = _UDP_HDR.unpack_from(data)
        if seq >= self.sent or data[_UDP_HDR.size :] != self._payload(seq):
            self.corrupt += 1
            return
        if seq >= len(self._seen):
            self._seen.extend(bytes(seq + 1024 - len(self._seen)))
        if self._seen[seq]:
            self.duplicates += 1
            return
        self._seen[seq] = 1
        self.received += 1
        if seq < self._highest:
            self.reordered += 1
        self._highest = max(self._highest, seq)


def run_client(
    host: str,
    port: int,
    *,
    rate: float | None = 1_000_000,
    duration: float | None = 5.0,
    tcp: int = 1,
    udp: int = 0,
    udp_pps: float = 200.0,
    udp_size: int = 512,
    seed: int = 1,
    interval: float = 0.0,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
    finish_timeout: float = 10.0,
) -> dict[str, Any]:
    """Run the verifying echo client; returns the report (see main's --json)."""
    from netns_testbed.stream import StreamEndpoint

    stop = stop or threading.Event()
    t0 = time.monotonic()
    eps: list[StreamEndpoint] = []
    probes: list[UdpProbe] = []
    errors: list[str] = []
    try:
        for i in range(tcp):
            try:
                sock = socket.create_connection((host, port), timeout=5.0)
            except OSError as e:
                raise EchoError(f"cannot connect to [{host}]:{port}: {e}") from e
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ep = StreamEndpoint(sock, tx_seed=seed + i, rx_seed=seed + i, rate=rate)
            eps.append(ep)
            ep.start()
        for i in range(udp):
            p = UdpProbe(host, port, pps=udp_pps, size=udp_size, seed=seed + 1000 + i)
            probes.append(p)
            p.start()
        end = None if duration is None else t0 + duration
        next_report = t0 + interval if interval > 0 else None
        while not stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if any(ep.stats.error for ep in eps):
                break
            waits = [0.1] + [t - now for t in (end, next_report) if t is not None]
            stop.wait(max(0.0, min(waits)))
            if next_report is not None and time.monotonic() >= next_report and progress:
                tx = sum(ep.stats.tx_bytes for ep in eps)
                rx = sum(ep.stats.rx_bytes for ep in eps)
                gap = max((ep.stats.max_rx_gap_s for ep in eps), default=0.0)
                progress(f"echo client: {time.monotonic() - t0:6.1f} s  tx {tx} B  rx {rx} B"
                         f"  max gap {gap * 1000:.1f} ms")  # fmt: skip
                next_report += interval
        for ep in eps:
            if ep.stats.error is None:
                ep.stop_sending()
        tcp_rep = []
        for i, ep in enumerate(eps):
            res = ep.finish(finish_timeout, check=False)
            if res.error is not None:
                errors.append(f"tcp flow {i}: {res.error}")
            elif res.rx_bytes != res.tx_bytes:
                errors.append(f"tcp flow {i}: sent {res.tx_bytes} B, got {res.rx_bytes} B back")
            tcp_rep.append(
                {
                    "flow": i,
                    "tx_bytes": res.tx_bytes,
                    "rx_bytes": res.rx_bytes,
                    "eof": res.eof,
                    "max_gap_ms": round(res.max_rx_gap_s * 1000, 3),
                    "error": res.error,
                }
            )
        udp_rep = []
        for i, p in enumerate(probes):
            r = {"flow": i, **p.stop()}
            if r["corrupt"] or r["duplicates"]:
                errors.append(f"udp flow {i}: {r['corrupt']} corrupt, {r['duplicates']} dup")
            udp_rep.append(r)
    finally:
        for ep in eps:
            ep.close()
            ep.socket.close()
        for p in probes:
            with contextlib.suppress(Exception):
                p.sock.close()
    gaps = [t["max_gap_ms"] for t in tcp_rep] + [u["max_gap_ms"] for u in udp_rep]
    return {
        "ok": not errors,
        "elapsed_s": round(time.monotonic() - t0, 3),
        "tx_bytes": sum(t["tx_bytes"] for t in tcp_rep),
        "rx_bytes": sum(t["rx_bytes"] for t in tcp_rep),
        "max_gap_ms": max(gaps, default=0.0),
        "errors": errors,
        "tcp": tcp_rep,
        "udp": udp_rep,
    }


# ---------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sessmob app echo", description="Migratable echo server and its verifying client."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the migratable echo server")
    s.add_argument("--rm-socket", help="the RM's application socket ($SESSMOB_RM_SOCKET)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP and UDP port (7000)")
    s.add_argument("--import-only", action="store_true",
                   help="create no session; only take over sessions moved here")  # fmt: skip
    s.add_argument("--no-udp", action="store_true",
                   help="echo TCP only (for an RM whose udp adapter is disabled)")  # fmt: skip
    s.add_argument("--name", default="echo", help="application name shown by the RM")
    s.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the RM")
    s.add_argument("--json", action="store_true", help="print the ready line as JSON")
    s.add_argument("-v", "--verbose", action="store_true", help="log more")
    c = sub.add_parser("client", help="send a verified stream and check the echo")
    c.add_argument("--connect", nargs=2, metavar=("ADDR", "PORT"), required=True)
    c.add_argument("--rate", type=float, default=1_000_000,
                   help="bytes/s per TCP connection (default 1000000; 0: saturate)")  # fmt: skip
    c.add_argument("--duration", type=float, default=None,
                   help="seconds to run (default: until SIGINT/SIGTERM)")  # fmt: skip
    c.add_argument("--tcp", type=int, default=1, help="TCP connections (default 1)")
    c.add_argument("--udp", type=int, default=0, help="UDP flows (default 0)")
    c.add_argument("--udp-pps", type=float, default=200.0, help="datagrams/s per UDP flow")
    c.add_argument("--udp-size", type=int, default=512, help="bytes per datagram")
    c.add_argument("--seed", type=int, default=1, help="pattern seed")
    c.add_argument("--interval", type=float, default=0.0,
                   help="print progress to stderr every this many seconds")  # fmt: skip
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap


def _until_signal(stop: threading.Event) -> Callable[[], None]:
    """Set `stop` on SIGINT/SIGTERM; returns a function restoring the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="echo[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    stop = threading.Event()
    restore = _until_signal(stop)
    srv = EchoServer(
        args.rm_socket, args.port, create_session=not args.import_only, name=args.name,
        timeout=args.timeout, udp=not args.no_udp,
    )  # fmt: skip
    try:
        srv.start()
    except (EchoError, AppKitError) as e:
        print(f"echo serve: {e}", file=sys.stderr)
        restore()
        return 1
    settle()  # start-up garbage out of the collector's way (see sessmob.hotpath)
    info = srv.ready_info()
    if args.json:
        print(json.dumps(info), flush=True)
    elif info["session"]:
        print(f"echo: session {info['session']} on {', '.join(info['addresses'])} port"
              f" {info['port']} (app {info['app']})", flush=True)  # fmt: skip
    else:
        print(f"echo: importer on port {info['port']} (app {info['app']})", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        srv.stop()
        restore()
    return 0


def _client(args: argparse.Namespace) -> int:
    host, port_s = args.connect
    try:
        port = int(port_s)
    except ValueError:
        print(f"echo client: port {port_s!r} is not a number", file=sys.stderr)
        return 2
    stop = threading.Event()
    restore = _until_signal(stop)
    try:
        report = run_client(
            host,
            port,
            rate=None if args.rate == 0 else args.rate,
            duration=args.duration,
            tcp=args.tcp,
            udp=args.udp,
            udp_pps=args.udp_pps,
            udp_size=args.udp_size,
            seed=args.seed,
            interval=args.interval,
            stop=stop,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (EchoError, ValueError, OSError) as e:
        print(f"echo client: {e}", file=sys.stderr)
        return 1
    finally:
        restore()
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print(f"echo client: {'OK' if report['ok'] else 'FAILED'} after {report['elapsed_s']} s:"
              f" tx {report['tx_bytes']} B, rx {report['rx_bytes']} B, longest gap"
              f" {report['max_gap_ms']} ms")  # fmt: skip
        for u in report["udp"]:
            print(
                f"  udp flow {u['flow']}: sent {u['sent']}, received {u['received']},"
                f" lost {u['lost']}, duplicates {u['duplicates']}, corrupt {u['corrupt']}"
            )
        for err in report["errors"]:
            print(f"  error: {err}")
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`sessmob app echo ...` delegates here."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cmd == "serve":
        if args.rm_socket is None and not os.environ.get("SESSMOB_RM_SOCKET"):
            print("echo serve: give --rm-socket PATH (or set $SESSMOB_RM_SOCKET)",
                  file=sys.stderr)  # fmt: skip
            return 2
        return _serve(args)
    return _client(args)


if __name__ == "__main__":
    sys.exit(main())
