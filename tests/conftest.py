"""Shared fixtures: namespace testbeds for the netns tests.

Tests under tests/netns/ get the ``netns`` marker automatically and are skipped (with the reason)
where namespaces cannot be made: not root, no netns support, no iproute2. ``lan`` is one testbed
per test module, ``fresh_lan`` one per test; both are torn down even when tests fail, and SIGTERM
is turned into KeyboardInterrupt so that pytest unwinds its fixtures instead of dying.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from netns_testbed.topology import Testbed

NETNS_TESTS = Path(__file__).parent / "netns"


def netns_skip_reason() -> str | None:
    """Why netns tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run as root or in CI)"
    if not os.path.exists("/proc/self/ns/net"):
        return "kernel without network namespace support"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') not installed"
    return None


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _sigterm_to_interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = netns_skip_reason()
    for item in items:
        if NETNS_TESTS in Path(item.path).parents:
            item.add_marker(pytest.mark.netns)
        if reason is not None and item.get_closest_marker("netns") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _build_lan() -> Testbed:
    reason = netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from netns_testbed.topology import TestbedUnavailable, build_lan

    try:
        return build_lan()
    except TestbedUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")


@pytest.fixture(scope="module")
def lan() -> Iterator[Testbed]:
    """The ``lan`` testbed (cn, ed, id on one bridge), shared by the tests of one module.

    Tests must leave it as they found it (e.g. remove the session address they added).
    """
    tb = _build_lan()
    try:
        yield tb
    finally:
        tb.teardown()


@pytest.fixture
def fresh_lan() -> Iterator[Testbed]:
    """A ``lan`` testbed of its own for one test."""
    tb = _build_lan()
    try:
        yield tb
    finally:
        tb.teardown()
