"""Both ends of the application protocol together: AppServer (RM side) and AppKit (app side).

No namespaces and no privileges: a fake SessionHost stands in for the RM daemon, flows are
real loopback sockets, and a "move" hands the RM's descriptors from one AppServer (the
exporting device) to another (the importing device). The tests that switch users run only as
root. The echo application runs here over loopback, without a move (the move with real TCP
repair is in tests/netns/test_appkit.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest

from sessmob.adapters.application import (
    AppError,
    ApplicationAdapter,
    AppServer,
    ImporterSpec,
)
from sessmob.adapters.base import Refused, Role, TransferOffer
from sessmob.appkit import AppKit, AppKitError, ImportedFlow
from sessmob.appproto import HEADER, PROTO_VERSION, encode_request, recv_chunk
from sessmob.session import Flow, FlowKind, ServiceSession, SessionAddress

T = TypeVar("T")
WAIT = 5.0


# -- fixtures ----------------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a thread: the RM side runs there, the blocking AppKits here."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrap() -> T:
            return fn()

        return self.run(wrap())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


class FakeHost:
    """The RM daemon's part: sessions with an address and the flows' sockets."""

    def __init__(self, name: str, addr: str = "127.0.0.1") -> None:
        self.name = name
        self.addr = addr
        self.sessions: dict[str, ServiceSession] = {}
        self.closed: list[str] = []
        self._n = 0

    async def create_session(self, app_id: str, session_type: str) -> ServiceSession:
        self._n += 1
        sid = f"{self.name}-{self._n}"
        plen = 128 if ":" in self.addr else 32
        s = ServiceSession(sid, session_type, [SessionAddress(self.addr, plen)], app_id=app_id)
        self.sessions[sid] = s
        return s

    async def add_flow(self, session_id: str, sock: socket.socket, flow_id: str | None) -> Flow:
        s = self.sessions[session_id]
        kind = FlowKind.TCP if sock.type == socket.SOCK_STREAM else FlowKind.UDP
        flow = Flow(flow_id or f"f{len(s.flows)}", kind, sock, sock.getsockname()[:2])
        s.flows.append(flow)
        return flow

    async def close_session(self, session_id: str) -> None:
        s = self.sessions.pop(session_id)
        for f in s.flows:
            if f.sock is not None:
                f.sock.close()
        self.closed.append(session_id)


class Recorder:
    """Callbacks of one AppKit, recording what the RM asked."""

    def __init__(self, state: bytes = b"state") -> None:
        self.state = state
        self.calls: list[tuple[str, str]] = []
        self.imported: dict[str, list[ImportedFlow]] = {}
        self.states: dict[str, bytes] = {}
        self.delay = 0.0
        self.fail: set[str] = set()

    def _note(self, op: str, sid: str) -> None:
        self.calls.append((op, sid))
        if op in self.fail:
            raise RuntimeError(f"{op} refused by the test")
        if self.delay:
            time.sleep(self.delay)

    def on_suspend(self, sid: str) -> bytes:
        self._note("suspend", sid)
        return self.state

    def on_import(self, sid: str, stype: str, state: bytes, flows: list[ImportedFlow]) -> None:
        self._note("import", sid)
        self.imported[sid] = flows
        self.states[sid] = state

    def on_resume(self, sid: str) -> None:
        self._note("resume", sid)

    def on_shutdown(self, sid: str) -> None:
        self._note("shutdown", sid)
        for f in self.imported.pop(sid, []):
            f.sock.close()

    def kit(self, path: Path, name: str, importer: bool = False, timeout: float = WAIT) -> AppKit:
        return AppKit.connect(
            str(path),
            name,
            importer_types=["demo"] if importer else [],
            on_suspend=self.on_suspend,
            on_import=self.on_import,
            on_resume=self.on_resume,
            on_shutdown=self.on_shutdown,
            timeout=timeout,
        )


class Device:
    """One device's RM side: a fake host and its AppServer on the shared loop."""

    def __init__(self, lt: LoopThread, path: Path, name: str, **kw: Any) -> None:
        self.lt = lt
        self.path = path
        self.host = FakeHost(name)
        kw.setdefault("allowed_uids", set())
        self.server = AppServer(str(path), self.host, **kw)
        lt.run(self.server.start())

    def close(self) -> None:
        self.lt.run(self.server.close())


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def devices(lt: LoopThread, tmp_path: Path) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(name: str = "ed", **kw: Any) -> Device:
        d = Device(lt, tmp_path / f"{name}.sock", name, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def kits() -> Iterator[list[AppKit]]:
    made: list[AppKit] = []
    yield made
    for k in made:
        k.close()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A temporary directory every user can reach and write (for tests that switch users)."""
    top = Path(tempfile.mkdtemp(prefix="sessmob-appkit-"))
    os.chmod(top, 0o777)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(client, server side) of a loopback TCP connection; the server side is the flow."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
    return c, s


def wait_for(pred: Callable[[], bool], timeout: float = WAIT) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def inode(sock: socket.socket | int) -> int:
    return os.fstat(sock if isinstance(sock, int) else sock.fileno()).st_ino


# -- the whole story ---------------------------------------------------------------------------


def test_session_moves_from_one_application_to_another(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed, id_ = devices("ed"), devices("id")
    a, b = Recorder(b"counter=42"), Recorder()
    ka = a.kit(ed.path, "exporter")
    kb = b.kit(id_.path, "importer", importer=True)
    kits += [ka, kb]

    s = ka.create_session("demo")
    assert s.addresses == ["127.0.0.1/32"] and s.address == "127.0.0.1"
    client, conn = tcp_pair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    assert ka.add_flow(s.session_id, conn) == "f0"
    assert ka.add_flow(s.session_id, udp, "u") == "u"
    flows = ed.host.sessions[s.session_id].flows
    assert [(f.flow_id, f.kind) for f in flows] == [("f0", FlowKind.TCP), ("u", FlowKind.UDP)]
    assert [inode(f.sock) for f in flows if f.sock] == [inode(conn), inode(udp)]

    assert id_.server.importer_for("demo") == kb.app_id
    assert ed.server.importer_for("demo") is None

    # ED: suspend; the application's state comes back, flows can no longer be added.
    state = lt.run(ed.server.suspend(ka.app_id or "", s.session_id))
    assert state == b"counter=42" and a.calls == [("suspend", s.session_id)]
    with pytest.raises(AppKitError, match="being moved"):
        ka.add_flow(s.session_id, socket.socket())

    # ID: the RM's sockets (here: duplicates of ED's) go to the importer with the state.
    arriving = ServiceSession(s.session_id, "demo", [SessionAddress("127.0.0.1", 32)])
    arriving.flows = [Flow(f.flow_id, f.kind, f.sock.dup() if f.sock else None) for f in flows]
    lt.run(id_.server.import_session(kb.app_id or "", arriving, state))
    assert b.calls == [("import", s.session_id)] and b.states[s.session_id] == b"counter=42"
    got = b.imported[s.session_id]
    assert [(f.flow_id, f.kind) for f in got] == [("f0", "tcp"), ("u", "udp")]
    assert [inode(f.sock) for f in got] == [inode(conn), inode(udp)]

    # ID: activation resumes the importer, which now owns the live connection.
    lt.run(id_.server.resume(kb.app_id or "", s.session_id))
    assert b.calls[-1] == ("resume", s.session_id)
    got[0].sock.sendall(b"from the importer")
    client.settimeout(WAIT)
    assert client.recv(100) == b"from the importer"

    # ED: after the commit the exporter lets go.
    lt.run(ed.server.shutdown(ka.app_id or "", s.session_id))
    assert a.calls[-1] == ("shutdown", s.session_id)
    lt.run(ed.server.shutdown(ka.app_id or "", s.session_id))  # idempotent: no second call
    assert a.calls.count(("shutdown", s.session_id)) == 1

    apps = {x["name"]: x for x in lt.call(id_.server.apps)}
    assert apps["importer"]["sessions"] == [s.session_id]
    assert apps["importer"]["importer_types"] == ["demo"]
    assert apps["importer"]["pid"] == os.getpid()
    assert lt.call(ed.server.apps)[0]["sessions"] == []
    for x in (client, conn, udp):
        x.close()
    for f in arriving.flows:
        if f.sock:
            f.sock.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def importer(devices: Callable[..., Device], kits: list[AppKit]) -> tuple[Device, Recorder, str]:
    """Device id with an importer application connected: (device, its recorder, app id)."""
    id_ = devices("id")
    b = Recorder()
    kb = b.kit(id_.path, "importer", importer=True)
    kits.append(kb)
    return id_, b, kb.app_id or ""


def test_prepared_import_hands_the_sockets_over_before_the_state(
    lt: LoopThread, importer: tuple[Device, Recorder, str]
) -> None:
    """prepare (at reservation) gives the importer the sockets; the import inside the window
    then carries only the state, and on_import gets those very sockets."""
    id_, b, app = importer
    client, conn = tcp_pair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lt.run(
        id_.server.prepare(
            app, "s1", "demo", [("f0", "tcp", conn.fileno()), ("u", "udp", udp.fileno())]
        )
    )
    assert b.calls == []  # nothing for the application's code yet
    arriving = ServiceSession("s1", "demo", [SessionAddress("127.0.0.1", 32)])
    answer = lt.run(
        id_.server.start_import(
            app, arriving, b"st", [("f0", "tcp"), ("u", "udp")], ["127.0.0.1/32"], prepared=True
        )
    )
    lt.run(_awaited(answer))
    assert b.calls == [("import", "s1")] and b.states["s1"] == b"st"
    got = b.imported["s1"]
    assert [(f.flow_id, f.kind) for f in got] == [("f0", "tcp"), ("u", "udp")]
    assert [inode(f.sock) for f in got] == [inode(conn), inode(udp)]
    kit = next(k for k in id_.server.apps() if k["app"] == app)
    assert kit["sessions"] == ["s1"]
    for x in (client, conn, udp):
        x.close()


async def _awaited(answer: Any) -> Any:
    return await answer


def test_prepared_sockets_are_dropped_when_no_import_or_a_plain_one_comes(
    lt: LoopThread, importer: tuple[Device, Recorder, str]
) -> None:
    id_, b, app = importer
    client, conn = tcp_pair()
    before = fd_count()
    lt.run(id_.server.prepare(app, "s1", "demo", [("f0", "tcp", conn.fileno())]))
    assert wait_for(lambda: fd_count() == before + 1)  # the kit's copy
    lt.run(id_.server.discard_prepared("s1"))  # the reservation went: the copy goes
    assert wait_for(lambda: fd_count() == before)
    assert b.calls == []  # not a session of the application: no on_shutdown
    lt.run(id_.server.discard_prepared("s1"))  # nothing left: a no-op

    # A plain import (sockets made anew, sent along) replaces what was prepared.
    lt.run(id_.server.prepare(app, "s2", "demo", [("f0", "tcp", conn.fileno())]))
    assert wait_for(lambda: fd_count() == before + 1)
    other_client, other = tcp_pair()
    arriving = ServiceSession("s2", "demo", [SessionAddress("127.0.0.1", 32)])
    arriving.flows = [Flow("f0", FlowKind.TCP, other)]
    lt.run(id_.server.import_session(app, arriving, b"x"))
    assert inode(b.imported["s2"][0].sock) == inode(other)
    for x in (client, conn, other_client, other):
        x.close()


def test_on_prepare_runs_at_prepare_and_its_failure_refuses_the_prepare(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    """on_prepare lets the application get ready before the freeze; if it raises, the
    prepare fails (the RM then uses the plain import) and the kit keeps no sockets."""
    id_ = devices("id")
    b = Recorder()
    prepared: list[tuple[str, str]] = []
    refuse = {"s2"}

    def on_prepare(sid: str, stype: str) -> None:
        if sid in refuse:
            raise RuntimeError("no room for it")
        prepared.append((sid, stype))

    kit = AppKit.connect(
        str(id_.path), "importer", importer_types=["demo"], on_prepare=on_prepare,
        on_import=b.on_import, on_resume=b.on_resume, on_shutdown=b.on_shutdown, timeout=WAIT,
    )  # fmt: skip
    kits.append(kit)
    app = kit.app_id or ""
    client, conn = tcp_pair()
    before = fd_count()
    lt.run(id_.server.prepare(app, "s1", "demo", [("f0", "tcp", conn.fileno())]))
    assert prepared == [("s1", "demo")]
    with pytest.raises(AppError, match="no room for it"):
        lt.run(id_.server.prepare(app, "s2", "demo", [("f0", "tcp", conn.fileno())]))
    assert prepared == [("s1", "demo")]
    lt.run(id_.server.discard_prepared("s1"))
    assert wait_for(lambda: fd_count() == before)  # neither prepare left a copy behind
    assert b.calls == []
    client.close()
    conn.close()


def test_prepared_import_without_or_with_other_sockets_is_refused(
    lt: LoopThread, importer: tuple[Device, Recorder, str]
) -> None:
    id_, b, app = importer
    arriving = ServiceSession("s1", "demo", [SessionAddress("127.0.0.1", 32)])

    async def imp(flows: list[tuple[str, str]]) -> None:
        answer = await id_.server.start_import(
            app, arriving, b"x", flows, ["127.0.0.1/32"], prepared=True
        )
        await answer

    with pytest.raises(AppError, match="no sockets were prepared"):
        lt.run(imp([("f0", "tcp")]))
    client, conn = tcp_pair()
    before = fd_count()
    lt.run(id_.server.prepare(app, "s1", "demo", [("f0", "tcp", conn.fileno())]))
    with pytest.raises(AppError, match="flows differ from the prepared"):
        lt.run(imp([("f1", "tcp")]))
    assert wait_for(lambda: fd_count() == before)  # the kit closed its copies
    assert b.calls == []
    client.close()
    conn.close()


def test_failed_move_resumes_the_exporter(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed = devices("ed")
    a = Recorder()
    ka = a.kit(ed.path, "app")
    kits.append(ka)
    s = ka.create_session("demo")
    lt.run(ed.server.suspend(ka.app_id or "", s.session_id))
    lt.run(ed.server.resume(ka.app_id or "", s.session_id))
    assert a.calls == [("suspend", s.session_id), ("resume", s.session_id)]
    client, conn = tcp_pair()
    assert ka.add_flow(s.session_id, conn) == "f0"  # active again
    client.close()
    conn.close()


def test_preencoded_requests_are_sent_as_encoded_and_answered(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit], monkeypatch: Any
) -> None:
    """suspend/resume encoded before the freeze (preencode) go out inside it unencoded again,
    under the id reserved for them, and their answers reach the RM as usual; a request in
    between keeps its own id; anything else is refused."""
    import sessmob.adapters.application as appmod

    ed = devices("ed")
    a = Recorder()
    ka = a.kit(ed.path, "app")
    kits.append(ka)
    app, s = ka.app_id or "", ka.create_session("demo")
    sid = s.session_id
    ed.server.preencode(app, "suspend", sid)
    ed.server.preencode(app, "resume", sid)
    encoded: list[str] = []
    real = appmod.encode_request

    def spy(op: str, *args: Any, **kw: Any) -> bytes:
        encoded.append(op)
        return real(op, *args, **kw)

    monkeypatch.setattr(appmod, "encode_request", spy)
    client, conn = tcp_pair()
    assert ka.add_flow(sid, conn) == "f0"  # the application's own request: unaffected
    assert lt.run(ed.server.suspend(app, sid)) == b"state"
    lt.run(ed.server.resume(app, sid))
    assert encoded == [] and a.calls == [("suspend", sid), ("resume", sid)]
    lt.run(ed.server.suspend(app, sid))  # used once: the next one is encoded as usual
    assert encoded == ["suspend"]
    with pytest.raises(ValueError, match="'shutdown' is not one of"):
        ed.server.preencode(app, "shutdown", sid)
    ed.server.preencode("nobody#1", "suspend", sid)  # no such application: nothing kept
    ed.server.preencode(app, "resume", "s-gone")  # an import that will not come ...
    lt.run(ed.server.discard_prepared("s-gone"))  # ... leaves no frame behind
    assert all(not c.ready for c in ed.server._conns.values())
    client.close()
    conn.close()


def test_application_errors_reach_the_rm_with_their_reason(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed = devices("ed")
    a = Recorder()
    a.fail = {"suspend"}
    ka = a.kit(ed.path, "fragile")
    kits.append(ka)
    s = ka.create_session("demo")
    with pytest.raises(AppError, match=r"fragile#\d+ .*failed suspend.*refused by the test"):
        lt.run(ed.server.suspend(ka.app_id or "", s.session_id))
    assert ed.server.is_connected(ka.app_id or "")  # an error reply is not a protocol error


def test_import_refused_by_the_application_closes_the_sockets(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    id_ = devices("id")
    b = Recorder()
    b.fail = {"import"}
    kb = b.kit(id_.path, "importer", importer=True)
    kits.append(kb)
    client, conn = tcp_pair()
    arriving = ServiceSession("s9", "demo", [SessionAddress("127.0.0.1", 32)])
    arriving.flows = [Flow("f0", FlowKind.TCP, conn)]
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(AppError, match="import refused by the test"):
        lt.run(id_.server.import_session(kb.app_id or "", arriving, b"x"))
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)
    lt.run(id_.server.shutdown(kb.app_id or "", "s9"))  # abort: harmless for the app
    assert ("shutdown", "s9") not in b.calls  # it never had the session
    client.close()
    conn.close()


def test_application_that_does_not_answer_times_out(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed = devices("ed", timeout=0.2)
    a = Recorder()
    ka = a.kit(ed.path, "slow")
    kits.append(ka)
    s = ka.create_session("demo")
    a.delay = 0.6
    t0 = time.monotonic()
    with pytest.raises(AppError, match=r"slow#\d+ .* did not answer suspend of session .* 0.2 s"):
        lt.run(ed.server.suspend(ka.app_id or "", s.session_id))
    assert time.monotonic() - t0 < 0.5
    a.delay = 0.0
    time.sleep(0.6)  # the late reply arrives and is ignored; the connection stays
    assert ed.server.is_connected(ka.app_id or "")
    lt.run(ed.server.resume(ka.app_id or "", s.session_id))


def test_request_to_a_missing_application(lt: LoopThread, devices: Callable[..., Device]) -> None:
    ed = devices("ed")
    with pytest.raises(AppError, match="does not run in application nobody#1"):
        lt.run(ed.server.suspend("nobody#1", "s1"))
    arriving = ServiceSession("s1", "demo")
    with pytest.raises(AppError, match="nobody#1 is gone"):
        lt.run(ed.server.import_session("nobody#1", arriving, b""))


def test_disconnect_closes_active_sessions_but_not_moving_ones(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed = devices("ed")
    a = Recorder()
    ka = a.kit(ed.path, "app")
    active = ka.create_session("demo")
    moving = ka.create_session("demo")
    lt.run(ed.server.suspend(ka.app_id or "", moving.session_id))
    ka.close()
    assert wait_for(lambda: active.session_id in ed.host.closed)
    assert moving.session_id not in ed.host.closed  # the move decides
    with pytest.raises(AppError, match="is gone"):
        lt.run(ed.server.resume(ka.app_id or "", moving.session_id))
    lt.run(ed.server.shutdown(ka.app_id or "", moving.session_id))  # no-op: nothing to close


def test_remove_and_close(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed = devices("ed")
    ka = Recorder().kit(ed.path, "app")
    kits.append(ka)
    s = ka.create_session("demo")
    client, conn = tcp_pair()
    fid = ka.add_flow(s.session_id, conn)
    rm_sock = ed.host.sessions[s.session_id].flows[0].sock
    assert rm_sock is not None
    ka.remove_flow(s.session_id, fid)
    assert ed.host.sessions[s.session_id].flows == [] and rm_sock.fileno() == -1
    with pytest.raises(AppKitError, match="no flow 'f0'"):
        ka.remove_flow(s.session_id, fid)
    ka.close_session(s.session_id)
    assert ed.host.closed == [s.session_id]
    with pytest.raises(AppKitError, match="does not belong"):
        ka.close_session(s.session_id)
    client.close()
    conn.close()


def test_add_flow_refuses_what_is_not_a_tcp_or_udp_socket(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed = devices("ed")
    ka = Recorder().kit(ed.path, "app")
    kits.append(ka)
    s = ka.create_session("demo")
    r, w = os.pipe()

    class PipeSock:  # add_flow only needs fileno(): hand it a pipe
        def fileno(self) -> int:
            return r

    with pytest.raises(AppKitError, match="not a socket"):
        ka.add_flow(s.session_id, PipeSock())  # type: ignore[arg-type]
    ux = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(AppKitError, match="not a TCP or UDP socket"):
        ka.add_flow(s.session_id, ux)
    with pytest.raises(AppKitError, match="does not belong"):
        ka.add_flow("someone-else", ux)
    assert ed.host.sessions[s.session_id].flows == []
    for fd in (r, w):
        os.close(fd)
    ux.close()


def test_callbacks_may_not_make_requests(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    ed = devices("ed")
    errors: list[str] = []
    kit_box: list[AppKit] = []

    def on_suspend(sid: str) -> bytes:
        try:
            kit_box[0].create_session("demo")
        except AppKitError as e:
            errors.append(str(e))
        return b""

    ka = AppKit.connect(str(ed.path), "app", on_suspend=on_suspend)
    kit_box.append(ka)
    kits.append(ka)
    s = ka.create_session("demo")
    assert lt.run(ed.server.suspend(ka.app_id or "", s.session_id)) == b""
    assert errors and "inside a callback" in errors[0]


# -- hostile or unexpected peers ---------------------------------------------------------------


def raw_client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(str(path))
    return s


def read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while True:
        data, fds = recv_chunk(s)
        for fd in fds:
            os.close(fd)
        if not data:
            return out
        out += data


@pytest.mark.parametrize(
    "junk",
    [
        HEADER.pack(1 << 31),  # oversized
        HEADER.pack(3) + b"\xc1\xc1\xc1",  # not msgpack
        encode_request("close_session", 1, {"session_id": "s"}),  # before hello
        HEADER.pack(1) + b"\x01",  # not a map
    ],
    ids=["oversized", "garbage", "no-hello", "not-a-map"],
)
def test_protocol_violation_drops_only_that_connection(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit], junk: bytes
) -> None:
    ed = devices("ed")
    good = Recorder().kit(ed.path, "good")
    kits.append(good)
    bad = raw_client(ed.path)
    bad.sendall(junk)
    assert read_until_closed(bad) == b""  # dropped without a word
    bad.close()
    s = good.create_session("demo")  # the others are untouched
    assert s.session_id in ed.host.sessions
    assert [x["name"] for x in lt.call(ed.server.apps)] == ["good"]


def test_too_many_requests_in_flight_drop_the_connection(
    lt: LoopThread, devices: Callable[..., Device]
) -> None:
    ed = devices("ed")

    async def never(app_id: str, session_type: str) -> ServiceSession:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    ed.host.create_session = never  # type: ignore[method-assign]
    s = raw_client(ed.path)
    s.sendall(encode_request("hello", 1, {"proto": PROTO_VERSION, "name": "greedy", "pid": 1,
                                          "importer_types": []}))  # fmt: skip
    flood = [encode_request("create_session", i, {"session_type": "x"}) for i in range(2, 80)]
    s.sendall(b"".join(flood))
    read_until_closed(s)  # the hello reply, then the RM hangs up
    s.close()
    assert lt.call(ed.server.apps) == []


def test_unknown_protocol_version_is_refused_with_a_reason(devices: Callable[..., Device]) -> None:
    ed = devices("ed")
    s = raw_client(ed.path)
    hello = {"proto": 99, "name": "future", "pid": 1, "importer_types": []}
    s.sendall(encode_request("hello", 1, hello))
    reply = read_until_closed(s)
    assert b"protocol version 99 not supported" in reply
    s.close()


def test_connect_without_an_rm_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(AppKitError, match="cannot connect to the Relocation Manager"):
        AppKit.connect(str(tmp_path / "none.sock"), "x")


def test_second_rm_on_the_same_socket_is_refused(
    lt: LoopThread, devices: Callable[..., Device], tmp_path: Path
) -> None:
    ed = devices("ed")
    other = AppServer(str(ed.path), FakeHost("x"), allowed_uids=set())
    with pytest.raises(AppError, match="already serves applications"):
        lt.run(other.start())


def test_stale_socket_file_is_replaced(lt: LoopThread, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    srv = AppServer(str(path), FakeHost("x"), allowed_uids=set())
    lt.run(srv.start())
    kit = AppKit.connect(str(path), "x")
    kit.close()
    lt.run(srv.close())
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_user_not_allowed_is_refused_with_a_reason(lt: LoopThread, open_dir: Path) -> None:
    """A process of uid 65534 (not in allowed_uids) connects: SO_PEERCRED refuses it."""
    ed = Device(lt, open_dir / "app.sock", "ed")
    os.chmod(ed.path, 0o666)  # let it reach the socket: the credential check must stop it
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become uid 65534, connect, pass on what the RM says
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(WAIT)
            s.connect(str(ed.path))
            os.write(w, s.recv(4096))
        except BaseException as e:
            os.write(w, f"child failed: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    ed.close()
    assert b"uid 65534 may not use this RM" in said, said


# -- importers ---------------------------------------------------------------------------------

IMPORTER = """
import os, threading
from sessmob.appkit import AppKit
gone = threading.Event()
kit = AppKit.connect(None, "launched", importer_types=[os.environ["SESSMOB_IMPORT_TYPE"]],
                     on_disconnect=lambda why: gone.set())
gone.wait(30)
"""


def test_importer_is_launched_when_none_is_connected(
    lt: LoopThread, devices: Callable[..., Device]
) -> None:
    spec = ImporterSpec([sys.executable, "-c", IMPORTER], env={"EXTRA": "1"})
    ed = devices("ed", importers={"demo": spec}, launch_timeout=20.0)
    assert ed.server.importer_for("demo") is None
    app_id = lt.run(ed.server.ensure_importer("demo"), timeout=30)
    assert app_id.startswith("launched#")
    apps = lt.call(ed.server.apps)
    assert apps[0]["launched"] and apps[0]["importer_types"] == ["demo"]
    pid = apps[0]["pid"]
    assert lt.run(ed.server.ensure_importer("demo")) == app_id  # connected now: no new launch
    ed.close()  # stops what it launched
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid))


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_importer_that_exits_or_is_missing(lt: LoopThread, devices: Callable[..., Device]) -> None:
    ed = devices(
        "ed",
        importers={"demo": ImporterSpec([sys.executable, "-c", "raise SystemExit(3)"])},
    )
    with pytest.raises(AppError, match="exited with status 3 before registering"):
        lt.run(ed.server.ensure_importer("demo"), timeout=30)
    with pytest.raises(AppError, match=r"none is configured .*\[importers.video\]"):
        lt.run(ed.server.ensure_importer("video"))


def test_importer_that_never_registers_is_killed(
    lt: LoopThread, devices: Callable[..., Device]
) -> None:
    spec = ImporterSpec(["sleep", "30"])
    ed = devices("ed", importers={"demo": spec}, launch_timeout=0.3)
    with pytest.raises(AppError, match=r"did not register within 0.3 s; killed it"):
        lt.run(ed.server.ensure_importer("demo"))


def test_importer_user_must_exist_and_not_be_root(tmp_path: Path) -> None:
    host = FakeHost("x")
    with pytest.raises(ValueError, match="is root"):
        AppServer(str(tmp_path / "a"), host, allowed_uids=set(),
                  importers={"demo": ImporterSpec(["true"], user="root")})  # fmt: skip
    with pytest.raises(ValueError, match="no such user"):
        AppServer(str(tmp_path / "a"), host, allowed_uids=set(),
                  importers={"demo": ImporterSpec(["true"], user="no-such-user-x")})  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to launch as another user")
def test_importer_runs_as_the_configured_user(
    lt: LoopThread, devices: Callable[..., Device], open_dir: Path
) -> None:
    out = open_dir / "who"
    script = (
        f'id -u > {out}; id -g >> {out}; id -G >> {out}; echo "$HOME $SESSMOB_IMPORT_TYPE" >> {out}'
    )
    spec = ImporterSpec(["/bin/sh", "-c", script], user="nobody")
    ed = devices("ed", importers={"demo": spec})
    with pytest.raises(AppError, match="exited with status 0"):
        lt.run(ed.server.ensure_importer("demo"))
    uid, gid, groups, env = out.read_text().splitlines()
    assert (uid, gid, groups) == ("65534", "65534", "65534")  # no supplementary root groups
    assert env.endswith(" demo")


# -- the adapter (interface A) -----------------------------------------------------------------


def test_application_adapter_primitives(
    lt: LoopThread, devices: Callable[..., Device], kits: list[AppKit]
) -> None:
    from sessmob.exchange import AppState, ExchangeDoc

    ed, id_ = devices("ed"), devices("id")
    a, b = Recorder(b"blob"), Recorder()
    ka, kb = a.kit(ed.path, "exporter"), b.kit(id_.path, "importer", importer=True)
    kits += [ka, kb]
    ed_ad, id_ad = ApplicationAdapter(ed.server), ApplicationAdapter(id_.server)
    assert ed_ad.name == "application"
    h = ka.create_session("demo")
    session = ed.host.sessions[h.session_id]

    res = lt.run(ed_ad.get_resources(session))
    assert res == {"session_type": "demo", "state_hint": 0}
    offer = TransferOffer(h.session_id, "demo", "ed", {"application": res})
    lt.run(id_ad.reserve_resources(offer))
    with pytest.raises(Refused, match="no importer for session type 'demo' on this device"):
        lt.run(ed_ad.reserve_resources(offer))  # nobody imports "demo" on ed

    lt.run(ed_ad.do_presignaling(session, Role.EXPORT))
    lt.run(ed_ad.suspend(session))
    assert session.app_state == b"blob"
    doc = ExchangeDoc(h.session_id, "demo", "ed")
    lt.run(ed_ad.get_state(session, doc))
    assert doc.apps == [AppState("demo", b"blob")]

    arriving = ServiceSession(h.session_id, "demo", [SessionAddress("127.0.0.1", 32)])
    lt.run(id_ad.set_state(arriving, doc))
    assert arriving.app_id == kb.app_id and b.states[h.session_id] == b"blob"
    lt.run(id_ad.resume(arriving, Role.IMPORT))
    lt.run(id_ad.do_postsignaling(arriving, Role.IMPORT))
    lt.run(ed_ad.shutdown(session, Role.EXPORT))
    assert a.calls == [("suspend", h.session_id), ("shutdown", h.session_id)]
    assert b.calls == [("import", h.session_id), ("resume", h.session_id)]

    empty = ExchangeDoc("s2", "demo", "ed")
    with pytest.raises(AppError, match="carries no application state"):
        lt.run(id_ad.set_state(ServiceSession("s2", "demo"), empty))
    lt.run(id_ad.release_resources(offer))


# -- the echo application over loopback (no move) ----------------------------------------------


@pytest.fixture
def echo_rm(lt: LoopThread, tmp_path: Path) -> Iterator[Device]:
    d = Device(lt, tmp_path / "app.sock", "ed")
    yield d
    d.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::", 0))
        port: int = s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", port))  # the UDP port must be free too
    return port


def test_echo_serve_and_client_over_loopback(echo_rm: Device) -> None:
    """`serve` registers a session with its address; `client` checks every echoed byte."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    srv = subprocess.Popen(
        [sys.executable, "-m", "sessmob.apps.echo", "serve", "--rm-socket", str(echo_rm.path),
         "--port", str(port), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert line, srv.stderr.read() if srv.stderr else ""
        info = json.loads(line)
        sid = info["session"]
        assert info["addresses"] == ["127.0.0.1/32"] and info["port"] == port
        session = echo_rm.host.sessions[sid]
        assert [f.kind for f in session.flows] == [FlowKind.UDP]

        cli = subprocess.run(
            [sys.executable, "-m", "sessmob.apps.echo", "client", "--connect", "127.0.0.1",
             str(port), "--rate", "2000000", "--duration", "1.5", "--tcp", "2", "--udp", "1",
             "--json"],
            capture_output=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        report = json.loads(cli.stdout)
        assert cli.returncode == 0, (report, cli.stderr)
        assert report["ok"] and not report["errors"]
        assert report["tx_bytes"] == report["rx_bytes"] > 4_000_000
        assert all(t["eof"] for t in report["tcp"])
        [u] = report["udp"]
        assert u["sent"] > 100 and u["received"] == u["sent"] and u["corrupt"] == 0
        # Both TCP connections were added to the session, and left it when they ended.
        assert wait_for(lambda: [f.kind for f in session.flows] == [FlowKind.UDP])
    finally:
        srv.terminate()
        srv.wait(10)
    assert srv.returncode == 0
    assert wait_for(lambda: sid in echo_rm.host.closed)  # leaving the RM ends the session


def test_echo_client_reports_a_corrupting_server() -> None:
    """The client must fail when the echo is wrong (here: one flipped byte)."""
    from sessmob.apps.echo import run_client

    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]

    def bad_echo() -> None:
        conn, _ = ls.accept()
        n = 0
        with conn:
            while data := conn.recv(65536):
                buf = bytearray(data)
                if n <= 5000 < n + len(buf):
                    buf[5000 - n] ^= 0xFF
                n += len(buf)
                conn.sendall(buf)
            conn.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=bad_echo, daemon=True)
    t.start()
    report = run_client("127.0.0.1", port, rate=1_000_000, duration=0.5, finish_timeout=3)
    ls.close()
    assert not report["ok"]
    assert "mismatch at offset 5000" in report["errors"][0]


def test_echo_state_survives_export_and_adopt() -> None:
    """The state blob carries each flow's counters and its not-yet-echoed bytes."""
    from sessmob.apps.echo import EchoError, EchoFlow, EchoSession, _parse_state

    a, b = socket.socketpair()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    es = EchoSession("s1")
    f = EchoFlow("f0", "tcp", a, echoed=10, pending=bytearray(b"abc"), eof=True)
    es.add(f)
    es.add(EchoFlow("f1", "udp", u, echoed=4, dgrams=deque([(b"dg", ("192.0.2.1", 9))])))
    saved = _parse_state(es.export())
    g = EchoFlow.adopt("f0", "tcp", a, saved["f0"])
    assert (g.echoed, bytes(g.pending), g.eof, g.shut) == (10, b"abc", True, False)
    h = EchoFlow.adopt("f1", "udp", u, saved["f1"])
    assert (h.echoed, list(h.dgrams)) == (4, [(b"dg", ("192.0.2.1", 9))])
    with pytest.raises(EchoError, match="state says tcp, socket is udp"):
        EchoFlow.adopt("f0", "udp", u, saved["f0"])
    with pytest.raises(EchoError, match="unknown version"):
        _parse_state(msgpack.packb({"v": 9}))
    es.stop()
    b.close()


_EPOLL_WAITS = {232, 281, 441}  # x86_64 epoll_wait, epoll_pwait, epoll_pwait2


def _waits_in_epoll(es: Any) -> bool:
    """The session's worker is blocked in an epoll wait (its current syscall, sleeping)."""
    tid = es._thread.native_id
    with open(f"/proc/self/task/{tid}/syscall") as f:
        nr = f.read().split()[0]
    with open(f"/proc/self/task/{tid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    return nr.isdigit() and int(nr) in _EPOLL_WAITS and state == "S"


def test_echo_worker_started_parked_serves_only_after_resume_and_pause_holds() -> None:
    """An imported session's worker starts parked (before the freeze): it touches no socket
    until resume(). pause() returns with the worker off the sockets without waking it, and
    the worker parks at its next wake-up."""
    from sessmob.apps.echo import EchoFlow, EchoSession

    a, b = socket.socketpair()
    es = EchoSession(None)
    es.start_parked()
    assert wait_for(lambda: es.stats()["parked"])
    es.session_id = "s1"
    es.add(EchoFlow("f0", "tcp", a))
    b.sendall(b"early")
    time.sleep(0.05)
    assert es.flows == [] and a.recv(5, socket.MSG_PEEK) == b"early"  # untouched while parked
    es.resume()
    b.settimeout(WAIT)
    assert b.recv(5) == b"early"
    # Idle in epoll first: a wake-up already on its way (the poke of add() while parked) would
    # have it park at once, which is not what this checks.
    assert wait_for(lambda: _waits_in_epoll(es))
    es.pause()
    time.sleep(0.05)
    assert not es.stats()["parked"]  # idle in epoll, not woken by the pause
    b.sendall(b"while paused")
    assert wait_for(lambda: es.stats()["parked"])  # woken by the data, it parked
    time.sleep(0.05)
    assert a.recv(64, socket.MSG_PEEK) == b"while paused"  # and echoed nothing
    es.resume()
    assert b.recv(64) == b"while paused"
    es.stop()
    b.close()
