"""The `sessmob` command: argument errors and exit codes, the table and JSON outputs, the
unreachable-RM message, and the hand-over of `rm` and `app` to their modules.

Session and device commands run against a real ControlServer (fake handler) on a temp socket.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessmob import cli
from sessmob.rm import control
from sessmob.rm.control import ControlServer, Credentials, MoveError

SESSIONS: list[dict[str, Any]] = [
    {
        "session": "s1",
        "type": "echo",
        "state": "active",
        "addresses": ["2001:db8::10/64"],
        "flows": [
            {"flow": "f0", "kind": "tcp", "local": "[2001:db8::10]:7", "remote": "[2001:db8::1]:5"},
            {"flow": "f1", "kind": "udp", "local": "[2001:db8::10]:9", "remote": None},
        ],
        "app": "app-1",
    },
    {
        "session": "session-with-a-long-name",
        "type": "echo",
        "state": "moving",
        "addresses": [],
        "flows": [],
        "app": None,
    },
]
DEVICES: list[dict[str, Any]] = [
    {"device": "id", "host": "2001:db8::2", "port": 4700},
    {"device": "laptop", "host": "192.0.2.7", "port": 4700},
]
TIMELINE: dict[str, Any] = {
    "session": "s1",
    "to": "id",
    "steps": [
        {"step": "Connect", "ms": 0.05},
        {"step": "CheckPreconditions", "ms": 0.41},
        {"step": "DoPresignaling", "ms": 0.1},
        {"step": "Suspend", "ms": 0.2},
        {"step": "GetState", "ms": 0.31},
        {"step": "InitiateSessionTransfer", "ms": 0.62},
        {"step": "ActivateSession", "ms": 0.5},
        {"step": "Shutdown", "ms": 12.25},
    ],
    "t_mig_ms": 1.7,
    "importer_steps": {"set_state_ms": 0.3, "postsignaling_ms": 0.05},
}


class FakeHandler:
    def __init__(self) -> None:
        self.sessions: list[dict[str, Any]] = SESSIONS
        self.devices: list[dict[str, Any]] = DEVICES
        self.move_error: BaseException | None = None
        self.moves: list[tuple[str, str]] = []

    async def session_list(self) -> list[dict[str, Any]]:
        return self.sessions

    async def session_show(self, session_id: str) -> dict[str, Any]:
        for s in self.sessions:
            if s["session"] == session_id:
                return s
        raise KeyError(session_id)

    async def session_move(self, session_id: str, device: str) -> dict[str, Any]:
        self.moves.append((session_id, device))
        if self.move_error is not None:
            raise self.move_error
        return TIMELINE

    async def device_list(self) -> list[dict[str, Any]]:
        return self.devices


class Rm:
    """A ControlServer in <dir>/control.sock on its own loop thread."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = str(state_dir)
        self.handler = FakeHandler()
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(
            str(state_dir / "control.sock"), self.handler, allowed_uids=set()
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def rm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rm]:
    monkeypatch.delenv("SESSMOB_STATE_DIR", raising=False)
    r = Rm(tmp_path)
    try:
        yield r
    finally:
        r.stop()


def sessmob(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def columns_start(header: str, names: list[str]) -> list[int]:
    return [header.index(n) for n in names]


# -- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "name an OBJECT"),
        (["session", "move", "s1"], "--to"),
        (["session", "move", "--to", "id"], "SESSION"),
        (["session", "show"], "SESSION"),
        (["session", "nuke"], "invalid choice: 'nuke'"),
        (["sessions", "list"], "invalid choice: 'sessions'"),
        (["session", "list", "extra"], "unrecognized arguments: extra"),
        (["device", "list", "--colour"], "unrecognized arguments: --colour"),
        (["--state", "/tmp", "session", "list"], "error:"),  # no abbreviations
        (["session", "move", "s1", "--to"], "expected one argument"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    rc, out, err = sessmob(capsys, *argv)
    assert rc == 2
    assert needle in err
    assert "usage: sessmob" in err
    assert out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["session", "--help"],
        ["session", "list", "--help"],
        ["session", "show", "-h"],
        ["session", "move", "--help"],
        ["device", "--help"],
        ["device", "list", "--help"],
    ],
)
def test_help_everywhere(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    rc, out, _ = sessmob(capsys, *argv)
    assert rc == 0
    assert out.startswith("usage: sessmob")
    assert "--json" in out or "OBJECT" in out


def test_move_help_explains_the_timeline(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = sessmob(capsys, "session", "move", "--help")
    assert "--to DEVICE" in out and "t_Mig" in out


def test_top_level_help_lists_every_object(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = sessmob(capsys, "--help")
    for obj in ("session", "device", "rm", "app"):
        assert f"    {obj} " in out
    assert "3 relocation manager unreachable" in " ".join(out.split())


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("sessmob")
    r = subprocess.run([str(exe), "session", "move", "s1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--to" in r.stderr


# -- reaching the RM ---------------------------------------------------------------------------


def test_rm_unreachable_exits_3_and_says_how_to_start_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, out, err = sessmob(capsys, "--state-dir", str(tmp_path), "session", "list")
    assert rc == 3
    assert out == ""
    assert f"no relocation manager at {tmp_path}/control.sock" in err
    assert f"sessmob rm --config FILE --state-dir {tmp_path}" in err


def test_state_dir_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str], rm: Rm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSMOB_STATE_DIR", rm.state_dir)
    rc, out, _ = sessmob(capsys, "device", "list")
    assert rc == 0 and "laptop" in out


def test_state_dir_option_beats_the_environment_in_either_position(
    capsys: pytest.CaptureFixture[str], rm: Rm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SESSMOB_STATE_DIR", str(tmp_path / "elsewhere"))
    assert sessmob(capsys, "--state-dir", rm.state_dir, "device", "list")[0] == 0
    assert sessmob(capsys, "device", "list", "--state-dir", rm.state_dir)[0] == 0
    assert sessmob(capsys, f"--state-dir={rm.state_dir}", "device", "list")[0] == 0
    assert sessmob(capsys, "device", "list")[0] == 3


def test_default_state_dir_is_run_sessmob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SESSMOB_STATE_DIR", raising=False)
    assert cli.state_dir(None) == "/run/sessmob"
    monkeypatch.setenv("SESSMOB_STATE_DIR", "/x")
    assert cli.state_dir(None) == "/x"
    assert cli.state_dir("/y") == "/y"


def test_a_refused_caller_exits_3(
    capsys: pytest.CaptureFixture[str], rm: Rm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "peer_credentials", lambda sock: Credentials(1, 1234, 1234))
    rc, _, err = sessmob(capsys, "--state-dir", rm.state_dir, "session", "list")
    assert rc == 3
    assert "uid 1234 may not control" in err


# -- session list / show -----------------------------------------------------------------------


def test_session_list_is_an_aligned_table(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, "session", "list")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3
    names = ["SESSION", "TYPE", "STATE", "ADDRESSES", "FLOWS", "APP"]
    starts = columns_start(lines[0], names)
    assert starts == sorted(starts)
    assert lines[1].split() == ["s1", "echo", "active", "2001:db8::10/64", "2", "app-1"]
    assert lines[2].split() == ["session-with-a-long-name", "echo", "moving", "-", "0", "-"]
    for line in lines[1:]:  # every value starts under its header
        for start in starts[1:]:
            assert line[start - 1] == " " and line[start] != " "


def test_session_list_bare_object_lists(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, "session")
    assert rc == 0 and out.startswith("SESSION")


@pytest.mark.parametrize(
    "argv", [["-j", "session", "list"], ["session", "list", "-j"], ["--json", "session"]]
)
def test_session_list_json(capsys: pytest.CaptureFixture[str], rm: Rm, argv: list[str]) -> None:
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, *argv)
    assert rc == 0
    assert json.loads(out) == SESSIONS


def test_no_sessions(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rm.handler.sessions = []
    assert sessmob(capsys, "--state-dir", rm.state_dir, "session", "list")[1] == "no sessions\n"
    assert json.loads(sessmob(capsys, "--state-dir", rm.state_dir, "-j", "session")[1]) == []


def test_session_show_text(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, "session", "show", "s1")
    assert rc == 0
    assert out.splitlines() == [
        "session s1  type echo  state active  app app-1",
        "    address 2001:db8::10/64",
        "    flow f0 tcp [2001:db8::10]:7 -> [2001:db8::1]:5",
        "    flow f1 udp [2001:db8::10]:9 -> -",
    ]


def test_session_show_json(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, "session", "show", "s1", "-j")
    assert rc == 0 and json.loads(out) == SESSIONS[0]


def test_session_show_unknown_exits_1(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, err = sessmob(capsys, "--state-dir", rm.state_dir, "session", "show", "nope")
    assert rc == 1
    assert out == ""
    assert err == "sessmob: no such session: nope\n"


# -- session move ------------------------------------------------------------------------------


def test_move_prints_the_timeline_table(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, "session", "move", "s1", "--to", "id")
    assert rc == 0
    assert rm.handler.moves == [("s1", "id")]
    lines = out.splitlines()
    assert lines[0] == "session s1 moved to id"
    assert lines[1].split() == ["step", "ms"]
    steps = [line.split() for line in lines[2:10]]
    assert steps == [[s["step"], f"{s['ms']:.3f}"] for s in TIMELINE["steps"]]
    assert lines[10] == "on id:"
    assert lines[11].split() == ["set_state_ms", "0.300"]
    assert lines[13].split() == ["t_Mig", "1.700"]
    # the ms column is right-aligned: every number ends in the same column
    ends = {len(line) for line in lines[1:] if line != "on id:"}
    assert len(ends) == 1


def test_a_moves_note_is_printed_after_the_timeline() -> None:
    from sessmob.cli import format_timeline

    tl = {**TIMELINE, "note": "reply lost; id then confirmed"}
    out = format_timeline(tl).splitlines()
    assert out[-1] == "note: reply lost; id then confirmed"
    assert out[-2].split()[0] == "t_Mig"
    assert "note" not in format_timeline(TIMELINE)


def test_move_json_is_the_timeline(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, _ = sessmob(
        capsys, "-j", "--state-dir", rm.state_dir, "session", "move", "s1", "--to", "id"
    )
    assert rc == 0 and json.loads(out) == TIMELINE


def test_move_failure_exits_1_with_step_and_reason(
    capsys: pytest.CaptureFixture[str], rm: Rm
) -> None:
    partial = {"session": "s1", "to": "id", "steps": [{"step": "Connect", "ms": 0.05}]}
    rm.handler.move_error = MoveError("CheckPreconditions", "no importer for echo on id", partial)
    rc, out, err = sessmob(
        capsys, "--state-dir", rm.state_dir, "session", "move", "s1", "--to", "id"
    )
    assert rc == 1
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "sessmob: move failed at CheckPreconditions: no importer for echo on id"
    assert "Connect" in err and "0.050" in err  # the partial timeline
    assert lines[-1] == "session s1 keeps running on this device"


def test_move_failure_json(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rm.handler.move_error = MoveError("ActivateSession", "peer: no reply within 5 s", {})
    rc, out, err = sessmob(
        capsys, "--state-dir", rm.state_dir, "session", "move", "s1", "--to", "id", "-j"
    )
    assert rc == 1
    doc = json.loads(out)
    assert doc["step"] == "ActivateSession" and doc["reason"] == "peer: no reply within 5 s"
    assert "move failed at ActivateSession" in err


def test_move_to_an_unknown_device(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rm.handler.move_error = MoveError("Connect", "unknown device 'tv' (known: id, laptop)")
    rc, _, err = sessmob(capsys, "--state-dir", rm.state_dir, "session", "move", "s1", "--to", "tv")
    assert rc == 1
    assert "move failed at Connect: unknown device 'tv' (known: id, laptop)" in err


def test_move_of_an_unknown_session(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rm.handler.move_error = KeyError("zz")
    rc, _, err = sessmob(capsys, "--state-dir", rm.state_dir, "session", "move", "zz", "--to", "id")
    assert rc == 1
    assert err == "sessmob: no such session: zz\n"


# -- device list -------------------------------------------------------------------------------


def test_device_list_table_and_json(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, "device", "list")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DEVICE", "HOST", "PORT"]
    assert lines[2].split() == ["laptop", "192.0.2.7", "4700"]
    assert lines[1].index("2001:db8::2") == lines[2].index("192.0.2.7") == lines[0].index("HOST")
    rc, out, _ = sessmob(capsys, "--state-dir", rm.state_dir, "device", "-j")
    assert rc == 0 and json.loads(out) == DEVICES


def test_no_devices(capsys: pytest.CaptureFixture[str], rm: Rm) -> None:
    rm.handler.devices = []
    assert "no devices" in sessmob(capsys, "--state-dir", rm.state_dir, "device")[1]


def test_format_table_fills_missing_cells() -> None:
    text = cli.format_table([{"a": 1, "b": [1, 2]}, {"a": "long value", "c": True}])
    assert text.splitlines() == ["A           B    C", "1           1,2  -", "long value  -    yes"]


# -- rm and app are handed over ----------------------------------------------------------------


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    mod = types.ModuleType("sessmob_test_fake")

    def main(argv: list[str]) -> int | None:
        calls.append(argv)
        if "--usage" in argv:
            raise SystemExit(2)  # what its argparse does
        return 7 if "--fail" in argv else None

    mod.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sessmob_test_fake", mod)
    return calls


def test_rm_hands_its_arguments_to_the_daemon(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fake_module: list[list[str]],
) -> None:
    monkeypatch.setattr(cli, "DAEMON_MODULE", "sessmob_test_fake")
    assert cli.main(["rm", "--config", "ed.toml", "--state-dir", "/s"]) == 0
    assert cli.main(["--state-dir", "/g", "-j", "rm", "--config", "ed.toml"]) == 0
    assert cli.main(["--state-dir", "/g", "rm", "--state-dir=/s", "--help"]) == 0
    assert cli.main(["rm", "--fail"]) == 7
    assert cli.main(["rm", "--usage"]) == 2  # its SystemExit becomes main's return value
    assert fake_module == [
        ["--config", "ed.toml", "--state-dir", "/s"],
        ["--config", "ed.toml", "--state-dir", "/g"],  # the global option is passed on
        ["--state-dir=/s", "--help"],  # ... unless rm has its own
        ["--fail"],
        ["--usage"],
    ]


def test_rm_without_the_daemon_module_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "DAEMON_MODULE", "sessmob.rm._no_such_daemon")
    rc, _, err = sessmob(capsys, "rm", "--config", "x.toml")
    assert rc == 1
    assert "relocation manager (sessmob rm) is not available" in err
    assert "sessmob.rm._no_such_daemon" in err


def test_app_echo_is_handed_its_arguments(
    monkeypatch: pytest.MonkeyPatch, fake_module: list[list[str]]
) -> None:
    monkeypatch.setitem(cli.APPS, "echo", "sessmob_test_fake")
    assert cli.main(["app", "echo", "serve", "--port", "7", "--help"]) == 0
    assert fake_module == [["serve", "--port", "7", "--help"]]


def test_app_without_its_module_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cli.APPS, "echo", "sessmob.apps._no_such_app")
    rc, _, err = sessmob(capsys, "app", "echo")
    assert rc == 1 and "echo application (sessmob app echo) is not available" in err


@pytest.mark.parametrize(
    ("argv", "rc", "needle"),
    [
        (["app"], 2, "usage: sessmob app {echo}"),
        (["app", "chess"], 2, "unknown application 'chess' (known: echo)"),
        (["app", "--help"], 0, "usage: sessmob app {echo}"),
    ],
)
def test_app_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], rc: int, needle: str
) -> None:
    got, out, err = sessmob(capsys, *argv)
    assert got == rc
    assert needle in (out if rc == 0 else err)
