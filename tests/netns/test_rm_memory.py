"""Memory of an idle Relocation Manager (issue 4: "an idle RM stays under 60 MB RSS").

RmBed starts `ip netns exec NS python -m sessmob.cli rm ...`; `ip netns exec` normally execs the
command in place, but if the Popen's pid is still the `ip` wrapper the RM is its child. The RM's
resident set (VmRSS) and its peak (VmHWM: it never went above) are read from /proc while it
runs with no session, after it has answered control requests for a while.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from netns_testbed.rmbed import DEVICES, RmBed
from netns_testbed.topology import Testbed

LIMIT_KB = 60_000_000 // 1024  # 60 MB read strictly (60e6 bytes = 58593 KiB, not 60 MiB)


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _is_rm(argv: list[str]) -> bool:
    return "sessmob.cli" in argv and "rm" in argv and os.path.basename(argv[0]) != "ip"


def rm_pid(popen_pid: int) -> int:
    """The pid of the python process running `sessmob.cli rm` (the Popen's or its child)."""
    if _is_rm(_cmdline(popen_pid)):
        return popen_pid
    for child in _children(popen_pid):
        if _is_rm(_cmdline(child)):
            return child
    raise LookupError(f"no `sessmob.cli rm` at pid {popen_pid} or below: {_cmdline(popen_pid)}")


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                value, unit = rest.split()
                assert unit == "kB", line
                out[key] = int(value)
    assert set(out) == {"VmRSS", "VmHWM"}, out
    return out


@pytest.fixture
def bed(fresh_lan: Testbed) -> Iterator[RmBed]:
    with RmBed(fresh_lan) as b:
        yield b


def test_rm_pid_looks_below_a_wrapper() -> None:
    """A wrapper that forks instead of exec'ing: rm_pid() finds the RM as its child."""
    child = "import time; time.sleep(30)"
    wrapper = subprocess.Popen(
        ["sh", "-c", f'"$0" -c "{child}" sessmob.cli rm; true', sys.executable]
    )
    try:
        deadline = time.monotonic() + 5
        while not _children(wrapper.pid):
            assert time.monotonic() < deadline, "the wrapper's child never started"
            time.sleep(0.01)
        time.sleep(0.05)  # the child's exec
        pid = rm_pid(wrapper.pid)
        assert pid != wrapper.pid and pid in _children(wrapper.pid)
        assert status_kb(pid)["VmRSS"] > 0
        with pytest.raises(LookupError, match=r"no `sessmob\.cli rm`"):
            rm_pid(os.getpid())
    finally:
        for p in _children(wrapper.pid):
            os.kill(p, signal.SIGTERM)
        wrapper.wait(5)


def test_idle_rm_stays_under_60_mb(bed: RmBed) -> None:
    pids = {dev: rm_pid(bed.procs[dev].pid) for dev in DEVICES}
    samples: dict[str, list[dict[str, int]]] = {dev: [] for dev in DEVICES}
    for _ in range(5):  # idle, but answering the controller now and then
        for dev in DEVICES:
            assert bed.sessions(dev) == []
            bed.control(dev).request("device.list")
            assert bed.procs[dev].poll() is None, bed.log(dev)
            samples[dev].append(status_kb(pids[dev]))
        time.sleep(0.2)
    for dev in DEVICES:
        rss = max(s["VmRSS"] for s in samples[dev])
        hwm = max(s["VmHWM"] for s in samples[dev])
        assert rss > 1024, f"{dev}: {rss} KiB resident: not the RM process?"
        assert hwm < LIMIT_KB, f"RM on {dev} peaked at {hwm} KiB RSS (limit {LIMIT_KB} KiB)"
        assert rss < LIMIT_KB, f"idle RM on {dev} uses {rss} KiB RSS (limit {LIMIT_KB} KiB)"
