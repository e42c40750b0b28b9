"""Every failure before the commit point leaves the session working on the exporting device.

Faults are injected through the RMs' [faults] configuration (an adapter primitive that
raises, or a delay that lets the reservation expire); the other failures are real: an
exchange document over the importer's limit, and a socket outside the session on its address.
After each failed move the echo client must still get every byte back, in order, from ed, and
a later move without the fault must work.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from netns_testbed.rmbed import RmBed
from netns_testbed.topology import Testbed
from sessmob import netns
from sessmob.cpu_awake import current_cpu_latency_us
from sessmob.rm.control import ControlError

from .test_rm_e2e import client, echo_serve, report

EXPORT_FAULTS = [
    "export:application.suspend",
    "export:net_addr.suspend",
    "export:tcp.suspend",
    "export:udp.suspend",
    "export:net_addr.get_state",
    "export:tcp.get_state",
    "export:udp.get_state",
    "export:application.get_state",
]
IMPORT_FAULTS = [
    "import:net_addr.set_state",
    "import:tcp.set_state",
    "import:udp.set_state",
    "import:application.set_state",
    "import:net_addr.resume",
    "import:tcp.resume",
]


def _session(bed: RmBed) -> tuple[str, str, subprocess.Popen[bytes]]:
    echo_serve(bed, "ed")
    echo_serve(bed, "id", import_only=True)
    s = bed.wait_session("ed")
    addr = s["addresses"][0].split("/")[0]
    c = client(bed, addr, "--duration", "4", "--tcp", "2", "--udp", "1", "--udp-pps", "100")
    bed.wait_flows("ed", "tcp", 2)
    time.sleep(0.3)
    return s["session"], addr, c


def _still_on_ed(bed: RmBed, sid: str, c: subprocess.Popen[bytes]) -> None:
    assert [s["session"] for s in bed.sessions("ed")] == [sid]
    assert bed.sessions("ed")[0]["state"] == "active"
    assert bed.sessions("id") == []
    rep = report(c)
    assert rep["ok"], rep
    assert all(f["tx_bytes"] == f["rx_bytes"] > 0 for f in rep["tcp"]), rep["tcp"]
    assert rep["udp"][0]["received"] > 0


@pytest.mark.parametrize("fault", EXPORT_FAULTS + IMPORT_FAULTS)
def test_adapter_failure_leaves_session_on_ed(fresh_lan: Testbed, fault: str) -> None:
    side = "ed" if fault.startswith("export:") else "id"
    with RmBed(fresh_lan, extra={side: f'[faults]\nfail = ["{fault}"]\n'}) as bed:
        sid, _, c = _session(bed)
        with pytest.raises(ControlError) as err:
            bed.move("ed", sid, "id")
        assert "injected fault" in str(err.value)
        _still_on_ed(bed, sid, c)


def test_rejected_exchange_document(fresh_lan: Testbed) -> None:
    with RmBed(fresh_lan, limits={"id": {"max_document": 64}}) as bed:
        sid, _, c = _session(bed)
        with pytest.raises(ControlError) as err:
            bed.move("ed", sid, "id")
        assert err.value.step.startswith("InitiateSessionTransfer")
        assert "document" in str(err.value)
        _still_on_ed(bed, sid, c)


DELAY_AFTER_CHECK = "[faults]\ndelay_after_check = 0.5\n"


def test_expired_reservation(fresh_lan: Testbed) -> None:
    with RmBed(
        fresh_lan,
        limits={"id": {"reservation_timeout": 0.2}},
        extra={"ed": DELAY_AFTER_CHECK},
    ) as bed:
        sid, _, c = _session(bed)
        with pytest.raises(ControlError) as err:
            bed.move("ed", sid, "id")
        assert "reservation" in str(err.value)
        _still_on_ed(bed, sid, c)


def test_socket_sharing_the_address_is_named(fresh_lan: Testbed) -> None:
    with RmBed(fresh_lan) as bed:
        sid, addr, c = _session(bed)
        stranger = netns.socket_in(fresh_lan.ns("ed"), socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            stranger.bind((addr, 7999))
            with pytest.raises(ControlError) as err:
                bed.move("ed", sid, "id")
            assert err.value.step == "GetResources" or "GetResources" in str(err.value)
            assert f"[{addr}]:7999" in str(err.value)
        finally:
            stranger.close()
        _still_on_ed(bed, sid, c)


def test_lost_activation_reply_leaves_one_owner(fresh_lan: Testbed) -> None:
    """ID activates, then its channel breaks before the reply leaves (ID stays up). ED must
    not resume: it asks ID again on a new channel, learns that ID activated, and shuts its
    part down. The move succeeds, with a note; the session runs on ID only, byte-exact."""
    fault = '[faults]\nfail = ["import:rm.activated_reply"]\n'
    with RmBed(fresh_lan, extra={"id": fault}) as bed:
        sid, _, c = _session(bed)
        out = bed.move("ed", sid, "id")
        assert "confirmed that it had activated" in out["note"], out
        assert bed.sessions("ed") == []
        assert [s["session"] for s in bed.sessions("id")] == [sid]
        bed.move("id", sid, "ed")  # and it moves on as usual
        assert [s["session"] for s in bed.sessions("ed")] == [sid]
        rep = report(c)
        assert rep["ok"], rep
        assert all(f["tx_bytes"] == f["rx_bytes"] > 0 for f in rep["tcp"]), rep["tcp"]


def test_an_activation_slower_than_eds_wait_is_learned_on_the_same_channel(
    fresh_lan: Testbed,
) -> None:
    """ID activates after ED stopped waiting for the reply (2 s), within its lease. ED's
    Abort, queued behind the transfer on the same channel, is answered "already activated":
    ED shuts its part down and the move succeeds, with a note. One owner, byte-exact."""
    fault = '[faults]\nfail = ["import:rm.slow_activation"]\n'
    with RmBed(fresh_lan, extra={"id": fault}) as bed:
        sid, _, c = _session(bed)
        out = bed.move("ed", sid, "id")
        assert "no reply from peer within 2 s" in out["note"], out
        assert "confirmed that it had activated" in out["note"], out
        assert bed.sessions("ed") == []
        assert [s["session"] for s in bed.sessions("id")] == [sid]
        rep = report(c)
        assert rep["ok"], rep
        assert all(f["tx_bytes"] == f["rx_bytes"] > 0 for f in rep["tcp"]), rep["tcp"]


def test_unreachable_importer_cannot_activate_after_ed_resumed(fresh_lan: Testbed) -> None:
    """ID hangs on the transfer (no answer at all) past its reservation's lifetime. ED waits
    in doubt until that lifetime is certainly over, then resumes; ID, awake again, must not
    activate what it was sent (its reservation expired). The session runs on ED only."""
    with RmBed(
        fresh_lan,
        limits={"id": {"reservation_timeout": 1.0}},
        extra={"id": '[faults]\nfail = ["import:rm.stall"]\n'},
    ) as bed:
        echo_serve(bed, "ed")
        echo_serve(bed, "id", import_only=True)
        sid = bed.wait_session("ed")["session"]
        addr = bed.sessions("ed")[0]["addresses"][0].split("/")[0]
        c = client(bed, addr, "--duration", "9", "--tcp", "2", "--udp", "1", "--udp-pps", "100")
        bed.wait_flows("ed", "tcp", 2)
        time.sleep(0.3)
        t = time.monotonic()
        with pytest.raises(ControlError) as err:
            bed.move("ed", sid, "id")
        waited = time.monotonic() - t
        assert err.value.step.startswith("InitiateSessionTransfer"), err.value
        assert "no reply" in str(err.value)
        assert waited >= 1.1, waited  # in doubt, ED held on until the reservation was over
        time.sleep(3.5)  # ID wakes up (after 3 s) and handles the transfer it was sent
        _still_on_ed(bed, sid, c)


def test_importer_unreachable_after_activating_is_not_joined_by_a_second_owner(
    fresh_lan: Testbed,
) -> None:
    """ID activates, its reply is lost and it stops listening for longer than its lease: ED
    never hears the outcome. Once the lease is over, ED finds the session address answered
    by another node (ID, running the session): it shuts its part down instead of resuming
    (which would put the address on the link twice), and says so. The session runs on ID
    only, byte-exact."""
    with RmBed(
        fresh_lan,
        limits={"id": {"reservation_timeout": 1.0}},
        extra={"id": '[faults]\nfail = ["import:rm.deaf_after_activation"]\n'},
    ) as bed:
        sid, addr, c = _session(bed)
        with pytest.raises(ControlError) as err:
            bed.move("ed", sid, "id")
        assert err.value.step.startswith("InitiateSessionTransfer"), err.value
        assert f"answers from another node ({addr} at " in str(err.value)
        assert "shut down here, not resumed" in str(err.value)
        assert bed.sessions("ed") == []
        assert [s["session"] for s in bed.sessions("id")] == [sid]
        rep = report(c)
        assert rep["ok"], rep
        assert all(f["tx_bytes"] == f["rx_bytes"] > 0 for f in rep["tcp"]), rep["tcp"]


@pytest.mark.parametrize("outcome", ["moved", "expired"])
def test_cpus_are_kept_awake_only_while_a_move_runs(fresh_lan: Testbed, outcome: str) -> None:
    """Both RMs hold the 0 µs CPU latency request during the move (here the pause after the
    check) and withdraw it afterwards, also when the move fails."""
    limits = {"id": {"reservation_timeout": 0.2}} if outcome == "expired" else {}
    with RmBed(fresh_lan, limits=limits, extra={"ed": DELAY_AFTER_CHECK}) as bed:
        sid, _, c = _session(bed)
        baseline = current_cpu_latency_us()
        assert baseline > 0
        seen: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.append(current_cpu_latency_us())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            if outcome == "moved":
                bed.move("ed", sid, "id")
            else:
                with pytest.raises(ControlError, match="reservation"):
                    bed.move("ed", sid, "id")
        finally:
            done.set()
            watcher.join()
        assert 0 in seen, seen
        deadline = time.monotonic() + 2
        while current_cpu_latency_us() != baseline and time.monotonic() < deadline:
            time.sleep(0.01)
        assert current_cpu_latency_us() == baseline
        if outcome == "expired":
            _still_on_ed(bed, sid, c)
        else:
            assert report(c)["ok"]


def test_an_rm_told_to_keep_the_cpus_awake_always_holds_it_until_it_stops(
    fresh_lan: Testbed,
) -> None:
    baseline = current_cpu_latency_us()
    assert baseline > 0
    with RmBed(fresh_lan, extra={"ed": '[moves]\nkeep_cpus_awake = "always"\n'}):
        deadline = time.monotonic() + 5
        while current_cpu_latency_us() != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert current_cpu_latency_us() == 0  # idle, no move: held all the same
    assert current_cpu_latency_us() == baseline  # the RM stopped: withdrawn


def test_an_importer_rm_restarted_after_activating_still_says_so(fresh_lan: Testbed) -> None:
    """ID's RM dies right after activating, before its reply; it is restarted within the
    lease. ED, in doubt, asks the new RM, which read its activation journal: "already
    activated". ED shuts its part down and the move succeeds, with a note; the importer
    application runs the session on, byte-exact."""
    fault = '[faults]\nfail = ["import:rm.crash_after_activation"]\n'
    with RmBed(fresh_lan, extra={"id": fault}) as bed:
        sid, _, c = _session(bed)
        restarted: list[int | None] = []

        def restart_id() -> None:
            old = bed.procs["id"]
            restarted.append(old.wait(20))
            bed.extra["id"] = ""  # the new RM runs without the fault
            bed.start_rm("id")

        t = threading.Thread(target=restart_id)
        t.start()
        try:
            out = bed.move("ed", sid, "id")
        finally:
            t.join()
        assert restarted == [70]
        assert "confirmed that it had activated" in out["note"], out
        assert bed.sessions("ed") == []
        rep = report(c)
        assert rep["ok"], rep
        assert all(f["tx_bytes"] == f["rx_bytes"] > 0 for f in rep["tcp"]), rep["tcp"]
