"""A session of a thousand connections moves as one, byte-exact, with traffic running."""

from __future__ import annotations

import resource
import time

import pytest

from netns_testbed.manyflows import ManyFlows
from netns_testbed.topology import Testbed


@pytest.fixture(autouse=True)
def enough_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))


@pytest.mark.parametrize("n", [1000])
def test_thousand_flows_move_byte_exact(fresh_lan: Testbed, n: int) -> None:
    with ManyFlows(fresh_lan, n) as mf:
        time.sleep(0.2)
        for _ in range(4):
            t = mf.move(hold=0.05)  # let data queue up: the move must carry it
            assert not t.post_commit_errors
            time.sleep(0.15)
        assert all(t.queued_bytes > 0 for t in mf.timings)
        assert mf.where == "ed"
        dev, cn = mf.finish()
        assert ManyFlows.check(dev, cn) == []
        assert sum(dev.rx) > 0 and sum(cn.rx) > 0
