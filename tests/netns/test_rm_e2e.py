"""The Relocation Manager end to end: RMs in ed and id, the echo application, a client in cn.

The client (the kernel's TCP in the cn namespace) sends a verifiable pattern continuously and
checks that every echoed byte comes back correct and in order; the session moves between the
devices while it runs. Failure paths must leave the session working where it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from netns_testbed.counters import CnCounters, read_tcp_counters
from netns_testbed.rmbed import RmBed
from netns_testbed.topology import Testbed
from sessmob import netns
from sessmob.rm.control import ControlError

PY = sys.executable


def echo_serve(bed: RmBed, dev: str, *, import_only: bool = False) -> subprocess.Popen[bytes]:
    """Start the echo app on `dev`; returns once `dev`'s RM has registered it."""
    argv = [PY, "-m", "sessmob.apps.echo", "serve", "--rm-socket", f"{bed.state_dir(dev)}/app.sock"]
    return bed.start_importer(dev, [*argv, "--import-only"] if import_only else argv)


def client(bed: RmBed, addr: str, *extra: str) -> subprocess.Popen[bytes]:
    return bed.start_app(
        "cn",
        [PY, "-m", "sessmob.apps.echo", "client", "--connect", addr, "7000", "--json", *extra],
    )


def report(p: subprocess.Popen[bytes]) -> dict:
    out, _ = p.communicate(timeout=60)
    assert out, f"client printed nothing; stderr:\n{RmBed.stderr_of(p)}"
    return json.loads(out.decode().strip().splitlines()[-1])


def cn_counters(tb: Testbed) -> dict[str, int]:
    with netns.entered(tb.ns("cn")):
        return read_tcp_counters()


@pytest.fixture
def bed(fresh_lan: Testbed) -> Iterator[RmBed]:
    with RmBed(fresh_lan) as b:
        yield b


def back_and_forth(bed: RmBed, sid: str, moves: int, pause: float) -> list[dict]:
    """Move the session ed -> id -> ed ... `moves` times; every move reply. After each move
    the session is on the target device only (never two owners)."""
    where, replies = "ed", []
    for _ in range(moves):
        to = "id" if where == "ed" else "ed"
        replies.append(bed.move(where, sid, to))
        assert [s["session"] for s in bed.sessions(to)] == [sid]
        assert bed.sessions(where) == []
        where = to
        time.sleep(pause)
    return replies


def start_session(
    bed: RmBed, flows: tuple[str, ...], duration: float
) -> tuple[str, subprocess.Popen[bytes]]:
    echo_serve(bed, "ed")
    echo_serve(bed, "id", import_only=True)
    s = bed.wait_session("ed")
    addr = s["addresses"][0].split("/")[0]
    c = client(bed, addr, "--duration", str(duration), *flows)
    bed.wait_flows("ed", "tcp", int(flows[flows.index("--tcp") + 1]) if "--tcp" in flows else 1)
    return s["session"], c


def test_echo_session_moves_fifty_times(bed: RmBed) -> None:
    before = cn_counters(bed.tb)
    sid, c = start_session(bed, ("--tcp", "1", "--rate", "1000000"), duration=40)
    replies = back_and_forth(bed, sid, 50, 0.05)
    # The importer held the sockets before the freeze (the prepared import) every time.
    assert all("set_state_application_wait_ms" in r["importer_steps"] for r in replies)
    c.terminate()
    rep = report(c)
    assert rep["ok"], rep
    assert rep["tx_bytes"] == rep["rx_bytes"] > 0
    assert CnCounters.between(before, cn_counters(bed.tb)).resets == 0


def test_plain_import_when_the_importer_could_not_be_prepared(fresh_lan: Testbed) -> None:
    """If handing the sockets over at the reservation fails, the move still works: the
    sockets are made inside the window and sent along with the state (the plain import)."""
    fault = '[faults]\nfail = ["import:application.prepare"]\n'
    with RmBed(fresh_lan, extra={"ed": fault, "id": fault}) as bed:
        sid, c = start_session(bed, ("--tcp", "2", "--rate", "1000000"), duration=20)
        for r in back_and_forth(bed, sid, 6, 0.05):
            assert "set_state_application_wait_ms" not in r["importer_steps"], r
            assert "set_state_application_ms" in r["importer_steps"], r
        c.terminate()
        rep = report(c)
        assert rep["ok"], rep
        assert all(f["tx_bytes"] == f["rx_bytes"] > 0 for f in rep["tcp"]), rep["tcp"]
        assert "import not prepared" in bed.log("id")


def test_three_tcp_and_one_udp_flow_move(bed: RmBed) -> None:
    sid, c = start_session(
        bed, ("--tcp", "3", "--udp", "1", "--rate", "500000", "--udp-pps", "200"), duration=30
    )
    back_and_forth(bed, sid, 10, 0.1)
    c.terminate()
    rep = report(c)
    assert rep["ok"], rep
    assert all(f["tx_bytes"] == f["rx_bytes"] > 0 for f in rep["tcp"]), rep["tcp"]
    udp = rep["udp"][0]
    assert udp["received"] > 0 and udp["corrupt"] == 0 and udp["duplicates"] == 0


def test_rms_without_the_udp_adapter_move_a_tcp_session(fresh_lan: Testbed) -> None:
    """`adapters` without udp: TCP sessions move as before; a UDP flow is refused when the
    application registers it, with the reason (not at move time)."""
    tcp_only = ["application", "net_addr", "tcp"]
    with RmBed(fresh_lan, adapters={"ed": tcp_only, "id": tcp_only}) as bed:
        refused = bed.start_app(
            "ed",
            [PY, "-m", "sessmob.apps.echo", "serve", "--port", "7001",
             "--rm-socket", f"{bed.state_dir('ed')}/app.sock"],
        )  # fmt: skip
        assert refused.wait(30) == 1
        assert "udp adapter is not enabled" in RmBed.stderr_of(refused)
        for dev, extra in (("ed", []), ("id", ["--import-only"])):
            argv = [PY, "-m", "sessmob.apps.echo", "serve", "--no-udp",
                    "--rm-socket", f"{bed.state_dir(dev)}/app.sock", *extra]  # fmt: skip
            bed.start_importer(dev, argv)
        s = bed.wait_session("ed")
        c = client(bed, s["addresses"][0].split("/")[0], "--duration", "20", "--rate", "1000000")
        bed.wait_flows("ed", "tcp")
        for r in back_and_forth(bed, s["session"], 6, 0.05):
            assert "set_state_udp_ms" not in r["importer_steps"], r["importer_steps"]
        c.terminate()
        rep = report(c)
        assert rep["ok"], rep
        assert rep["tx_bytes"] == rep["rx_bytes"] > 0


def test_importer_missing_refuses_and_session_keeps_running(bed: RmBed) -> None:
    echo_serve(bed, "ed")  # no importer on id, none configured
    s = bed.wait_session("ed")
    c = client(bed, s["addresses"][0].split("/")[0], "--duration", "3", "--tcp", "1")
    time.sleep(0.5)
    with pytest.raises(ControlError) as err:
        bed.move("ed", s["session"], "id")
    assert err.value.step == "CheckPreconditions"
    assert "importer" in str(err.value)
    assert [x["session"] for x in bed.sessions("ed")] == [s["session"]]
    rep = report(c)
    assert rep["ok"] and rep["tx_bytes"] == rep["rx_bytes"] > 0, rep


def test_unreachable_importing_device_leaves_session_on_ed(bed: RmBed) -> None:
    sid, c = start_session(bed, ("--tcp", "1"), duration=3)
    bed.procs["id"].terminate()
    bed.procs["id"].wait(5)
    with pytest.raises(ControlError) as err:
        bed.move("ed", sid, "id")
    assert err.value.step in ("Connect", "CheckPreconditions")
    assert bed.sessions("ed")[0]["state"] == "active"
    rep = report(c)
    assert rep["ok"] and rep["tx_bytes"] == rep["rx_bytes"] > 0, rep


def test_unknown_device_and_session_give_clear_errors(bed: RmBed) -> None:
    echo_serve(bed, "ed")
    s = bed.wait_session("ed")
    with pytest.raises(ControlError, match="unknown device"):
        bed.move("ed", s["session"], "nowhere")
    with pytest.raises(ControlError, match=r"no such session|no session"):
        bed.move("ed", "ed-999-none", "id")
