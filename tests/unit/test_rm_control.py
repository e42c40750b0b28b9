"""Interface U: ControlServer (the RM's side) and ControlClient (the controller's) on a temp
unix socket, with a fake handler: each command, the error replies, hostile lines, the socket's
mode and lifetime, and the peer-credential check.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessmob.rm import control
from sessmob.rm.control import (
    ControlClient,
    ControlError,
    ControlServer,
    ControlUnreachable,
    Credentials,
    MoveError,
    peer_credentials,
    uid_allowed,
)

SESSIONS = [
    {
        "session": "s1",
        "type": "echo",
        "state": "active",
        "addresses": ["2001:db8::10/64"],
        "flows": [
            {"flow": "f0", "kind": "tcp", "local": "[2001:db8::10]:7", "remote": "[2001:db8::1]:5"}
        ],
        "app": "app-1",
    }
]
DEVICES = [{"device": "id", "address": "2001:db8::2", "port": 4700}]
TIMELINE = {
    "session": "s1",
    "to": "id",
    "steps": [{"step": "CheckPreconditions", "ms": 0.41}, {"step": "Suspend", "ms": 0.2}],
    "t_mig_ms": 1.7,
}


class FakeHandler:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.move_error: BaseException | None = None

    async def session_list(self) -> list[dict[str, Any]]:
        self.calls.append(("list",))
        return SESSIONS

    async def session_show(self, session_id: str) -> dict[str, Any]:
        self.calls.append(("show", session_id))
        for s in SESSIONS:
            if s["session"] == session_id:
                return s
        raise KeyError(session_id)

    async def session_move(self, session_id: str, device: str) -> dict[str, Any]:
        self.calls.append(("move", session_id, device))
        if self.move_error is not None:
            raise self.move_error
        return {**TIMELINE, "session": session_id, "to": device}

    async def device_list(self) -> list[dict[str, Any]]:
        self.calls.append(("devices",))
        return DEVICES


class Running:
    """A ControlServer on its own event loop thread, so blocking clients can call it."""

    def __init__(self, path: str, handler: Any, allowed_uids: set[int] | None = None) -> None:
        self.path = path
        self.handler = handler
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, handler, allowed_uids=allowed_uids or set())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def rm(tmp_path: Path) -> Iterator[Running]:
    r = Running(str(tmp_path / "control.sock"), FakeHandler())
    try:
        yield r
    finally:
        r.stop()


def raw_lines(path: str, data: bytes, n: int) -> list[dict[str, Any]]:
    """Send raw bytes, read `n` reply lines (or fewer if the server closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(data)
        out = []
        with s.makefile("rb") as f:
            for _ in range(n):
                line = f.readline()
                if not line:
                    break
                out.append(json.loads(line))
        return out


# -- commands ----------------------------------------------------------------------------------


def test_session_list(rm: Running) -> None:
    assert ControlClient(rm.path).request("session.list") == {"sessions": SESSIONS}
    assert rm.handler.calls == [("list",)]


def test_session_show(rm: Running) -> None:
    assert ControlClient(rm.path).request("session.show", session="s1") == SESSIONS[0]


def test_session_show_unknown_session_is_not_found(rm: Running) -> None:
    with pytest.raises(ControlError) as ei:
        ControlClient(rm.path).request("session.show", session="nope")
    assert ei.value.kind == "not_found"
    assert ei.value.message == "no such session: nope"
    assert not isinstance(ei.value, ControlUnreachable)


def test_session_move_returns_the_timeline(rm: Running) -> None:
    tl = ControlClient(rm.path).request("session.move", session="s1", device="id")
    assert tl == TIMELINE
    assert rm.handler.calls == [("move", "s1", "id")]


def test_device_list(rm: Running) -> None:
    assert ControlClient(rm.path).request("device.list") == {"devices": DEVICES}


def test_move_error_carries_step_reason_and_partial_timeline(rm: Running) -> None:
    partial = {"session": "s1", "to": "id", "steps": [{"step": "Connect", "ms": 0.1}]}
    rm.handler.move_error = MoveError("CheckPreconditions", "importer missing on id", partial)
    with pytest.raises(ControlError) as ei:
        ControlClient(rm.path).request("session.move", session="s1", device="id")
    e = ei.value
    assert e.kind == "move_failed"
    assert e.message == "move failed at CheckPreconditions: importer missing on id"
    assert (e.step, e.reason, e.timeline) == (
        "CheckPreconditions",
        "importer missing on id",
        partial,
    )


def test_move_key_error_keeps_the_handlers_sentence(rm: Running) -> None:
    rm.handler.move_error = KeyError("no session 'zz' on ed")
    with pytest.raises(ControlError, match="no session 'zz' on ed") as ei:
        ControlClient(rm.path).request("session.move", session="zz", device="id")
    assert ei.value.kind == "not_found"


def test_move_key_error_naming_the_device(rm: Running) -> None:
    rm.handler.move_error = KeyError("tv")
    with pytest.raises(ControlError, match="no such device: tv"):
        ControlClient(rm.path).request("session.move", session="s1", device="tv")


def test_handler_crash_is_an_internal_error_and_the_server_lives_on(rm: Running) -> None:
    rm.handler.move_error = ZeroDivisionError("division by zero")
    with pytest.raises(ControlError, match=r"internal error.*ZeroDivisionError") as ei:
        ControlClient(rm.path).request("session.move", session="s1", device="id")
    assert ei.value.kind == "internal"
    assert ControlClient(rm.path).request("device.list") == {"devices": DEVICES}


# -- bad requests ------------------------------------------------------------------------------


def test_unknown_command(rm: Running) -> None:
    with pytest.raises(ControlError, match=r"unknown command 'session\.nuke'.*session\.move") as ei:
        ControlClient(rm.path).request("session.nuke")
    assert ei.value.kind == "bad_request"
    assert rm.handler.calls == []


@pytest.mark.parametrize(
    ("cmd", "args"),
    [
        ("session.move", {"session": "s1"}),
        ("session.move", {"device": "id"}),
        ("session.move", {"session": "", "device": "id"}),
        ("session.show", {}),
        ("session.show", {"session": 5}),
    ],
)
def test_missing_or_mistyped_arguments(rm: Running, cmd: str, args: dict[str, Any]) -> None:
    with pytest.raises(ControlError, match="needs") as ei:
        ControlClient(rm.path).request(cmd, **args)
    assert ei.value.kind == "bad_request"
    assert rm.handler.calls == []


def test_malformed_json_gets_an_error_and_the_connection_keeps_working(rm: Running) -> None:
    replies = raw_lines(
        rm.path,
        b'{"cmd": "session.list"\n'  # cut short
        b"\xff\xfe not even utf-8\n"
        b'["a list"]\n'
        b'{"cmd": 5}\n'
        b'{"cmd": "device.list", "args": [1]}\n'
        b"\n"  # blank lines are skipped
        b'{"cmd": "device.list"}\n',
        6,
    )
    assert [r["ok"] for r in replies] == [False] * 5 + [True]
    assert "malformed JSON" in replies[0]["error"]["message"]
    assert "malformed JSON" in replies[1]["error"]["message"]
    assert all(r["error"]["kind"] == "bad_request" for r in replies[:5])
    assert replies[5]["result"] == {"devices": DEVICES}


def test_overlong_line_is_refused_and_the_server_lives_on(rm: Running) -> None:
    replies = raw_lines(rm.path, b"x" * (control.MAX_LINE + 10) + b"\n", 2)
    assert len(replies) == 1 and "over" in replies[0]["error"]["message"]
    assert ControlClient(rm.path).request("device.list") == {"devices": DEVICES}


def test_unserialisable_result_is_an_internal_error(tmp_path: Path) -> None:
    class Odd(FakeHandler):
        async def device_list(self) -> list[dict[str, Any]]:
            return [{"device": object()}]

    r = Running(str(tmp_path / "c.sock"), Odd())
    try:
        with pytest.raises(ControlError, match="not JSON-able"):
            ControlClient(r.path).request("device.list")
    finally:
        r.stop()


# -- reaching the RM ---------------------------------------------------------------------------


def test_no_rm_is_unreachable_with_a_hint_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(ControlUnreachable) as ei:
        ControlClient(str(tmp_path / "control.sock")).request("session.list")
    msg = ei.value.message
    assert "no relocation manager at" in msg
    assert f"sessmob rm --config FILE --state-dir {tmp_path}" in msg


def test_stale_socket_file_is_unreachable_then_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a crashed RM
    with pytest.raises(ControlUnreachable, match="Connection refused"):
        ControlClient(path).request("session.list")
    r = Running(path, FakeHandler())
    try:
        assert ControlClient(path).request("device.list") == {"devices": DEVICES}
    finally:
        r.stop()


def test_a_second_rm_on_the_same_socket_is_refused(rm: Running) -> None:
    with pytest.raises(FileExistsError, match="already serves"):
        rm.call(ControlServer(rm.path, FakeHandler(), allowed_uids=set()).start())
    assert ControlClient(rm.path).request("device.list") == {"devices": DEVICES}


def test_socket_mode_is_0660_and_close_removes_it(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "control.sock")
    old = os.umask(0)  # a permissive umask must not leak into the socket's mode
    try:
        r = Running(path, FakeHandler())
    finally:
        os.umask(old)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert os.listdir(os.path.dirname(path)) == ["control.sock"]  # no temp left
    finally:
        r.stop()
    assert not os.path.exists(path)


def test_path_too_long_for_a_unix_socket_is_a_clear_error(tmp_path: Path) -> None:
    path = str(tmp_path / ("d" * 120) / "control.sock")
    with pytest.raises(OSError, match=r"too long.*--state-dir"):
        asyncio.run(ControlServer(path, FakeHandler(), allowed_uids=set()).start())


def test_client_timeout_says_the_move_may_still_run(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)  # accepts (in the backlog) but never answers
    try:
        with pytest.raises(ControlError, match=r"no reply .* within 0\.2 s") as ei:
            ControlClient(path, timeout=0.2).request("session.list")
        assert ei.value.kind == "timeout"
    finally:
        mute.close()


# -- who may control the RM --------------------------------------------------------------------


def test_peer_credentials_are_the_kernels() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == Credentials(os.getpid(), os.getuid(), os.getgid())


def test_uid_allowed_root_always_others_only_when_listed() -> None:
    assert uid_allowed(0, set())
    assert not uid_allowed(1000, set())
    assert not uid_allowed(1000, {1001})
    assert uid_allowed(1000, {1000, 1001})


def test_a_caller_not_allowed_is_refused_before_any_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "peer_credentials", lambda sock: Credentials(4242, 1234, 1234))
    r = Running(str(tmp_path / "c.sock"), FakeHandler())
    try:
        with pytest.raises(ControlUnreachable, match="uid 1234 may not control") as ei:
            ControlClient(r.path).request("session.move", session="s1", device="id")
        assert ei.value.kind == "denied"
        assert r.handler.calls == []
    finally:
        r.stop()


def test_a_listed_uid_is_let_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "peer_credentials", lambda sock: Credentials(4242, 1234, 1234))
    r = Running(str(tmp_path / "c.sock"), FakeHandler(), allowed_uids={1234})
    try:
        assert ControlClient(r.path).request("device.list") == {"devices": DEVICES}
    finally:
        r.stop()


NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path lives under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="sessmob-u-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def request_as(uid: int, path: str) -> str:
    """What a device.list gets from a forked child running as `uid`: "ok" or the error."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec (the venv may not be readable by uid); exit without cleanup
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                ControlClient(path, timeout=5).request("device.list")
                out = "ok"
            except ControlError as e:
                out = f"{e.kind}: {e.message}"
            os.write(wfd, out.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        result = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
@pytest.mark.parametrize(
    ("allowed", "expect"),
    [(set(), "denied: permission denied: uid 65534 may not"), ({NOBODY}, "ok")],
)
def test_so_peercred_check_with_a_real_other_uid(
    open_dir: Path, allowed: set[int], expect: str
) -> None:
    path = str(open_dir / "c.sock")
    r = Running(path, FakeHandler(), allowed_uids=allowed)
    try:
        os.chmod(path, 0o666)  # let the file through, so that only SO_PEERCRED decides
        assert request_as(NOBODY, path).startswith(expect)
        assert r.handler.calls == ([] if expect != "ok" else [("devices",)])
    finally:
        r.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_the_socket_file_mode_keeps_other_users_out(open_dir: Path) -> None:
    path = str(open_dir / "c.sock")
    r = Running(path, FakeHandler(), allowed_uids={NOBODY})
    try:
        # 0660 root:root: even a listed uid needs the group (or root) to open the socket
        assert request_as(NOBODY, path).startswith(f"denied: permission denied on {path}")
        assert r.handler.calls == []
    finally:
        r.stop()
