"""The raw move on the real kernel: a live connection hops between ed and id while the CN
(the kernel's own TCP, in its own process) streams; every byte is verified in both directions
and the CN's counters must show no reset.
"""

from __future__ import annotations

import time

import pytest

from netns_testbed.rawmove import PHASES, MoveFailed
from netns_testbed.scenario import MovingStream
from netns_testbed.topology import Testbed

MOVES = 50
RATES = {"idle": 0.0, "paced": 10e6, "saturated": None}


def _finish_clean(ms: MovingStream) -> None:
    fin = ms.finish()
    assert fin.bytes_lost == 0 and fin.bytes_duplicated == 0
    assert fin.local.ok and fin.cn["eof"], (fin.local, fin.cn)
    assert fin.counters.resets == 0, f"CN saw resets: {fin.counters}"


@pytest.mark.parametrize("kind", ["ipv6", "ipv4", "v4mapped"])
@pytest.mark.parametrize("load", list(RATES))
def test_fifty_moves_byte_exact(lan: Testbed, kind: str, load: str) -> None:
    rate = RATES[load]
    with MovingStream(lan, kind=kind, rate=rate) as ms:
        progress = 0 if rate == 0 else 32 * 1024
        ms.wait_progress(progress)
        for i in range(MOVES):
            ms.move(via_bytes=(i % 5 == 4))
            ms.wait_progress(progress)
        assert ms.where == "ed"  # an even number of moves ends where it began
        _finish_clean(ms)


def test_snapshot_through_bytes_behaves_like_original(lan: Testbed) -> None:
    with MovingStream(lan, kind="ipv6", rate=10e6) as ms:
        ms.wait_progress(64 * 1024)
        for _ in range(4):
            ms.move(via_bytes=True)
            ms.wait_progress(64 * 1024)
        _finish_clean(ms)


@pytest.mark.parametrize("phase", PHASES[: PHASES.index("activate") + 1])
def test_failed_move_resumes_on_ed(lan: Testbed, phase: str) -> None:
    with MovingStream(lan, kind="ipv6", rate=10e6) as ms:
        ms.wait_progress(64 * 1024)
        with pytest.raises(MoveFailed) as err:
            ms.move(fail_at=phase)
        assert err.value.step == phase
        assert ms.where == "ed"
        assert ms.mover.devices["ed"].rtnl.has_address(ms.mover.addr)
        assert not ms.mover.devices["id"].rtnl.has_address(ms.mover.addr)
        ms.wait_progress(256 * 1024)  # still flowing on ed, both ways
        ms.move()  # and the next move works
        ms.wait_progress(64 * 1024)
        _finish_clean(ms)


def test_move_timings_are_complete(lan: Testbed) -> None:
    with MovingStream(lan, kind="ipv6", rate=10e6) as ms:
        ms.wait_progress(64 * 1024)
        t = ms.move()
        assert list(t.phases) == list(PHASES)
        assert all(v > 0 for v in t.phases.values())
        assert t.freeze_to_restored < t.t_mig
        assert abs(sum(t.phases.values()) - t.t_mig) < 1e-6
        time.sleep(0.01)
        ms.move()
        _finish_clean(ms)
