"""CpuAwake: one CPU latency request, shared by counted holds; and the real request (root)."""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import pytest

from sessmob.cpu_awake import CPU_LATENCY_DEV, CpuAwake, current_cpu_latency_us


def test_holds_share_one_request_and_the_last_release_withdraws_it(tmp_path: Path) -> None:
    path = tmp_path / "latency"
    path.write_bytes(b"")
    awake = CpuAwake(path=str(path))
    a = awake.hold()
    assert awake.held and path.read_bytes() == struct.pack("=i", 0)
    b = awake.hold()
    assert path.read_bytes() == struct.pack("=i", 0)  # no second request
    a.release()
    a.release()  # idempotent: does not take b's share
    assert awake.held
    with b:
        pass
    assert not awake.held
    with awake.hold():
        assert awake.held
    assert not awake.held


def test_close_withdraws_whatever_is_held(tmp_path: Path) -> None:
    path = tmp_path / "latency"
    path.write_bytes(b"")
    awake = CpuAwake(path=str(path))
    h = awake.hold()
    awake.hold()
    awake.close()
    assert not awake.held
    h.release()  # after close: nothing to do, nothing breaks
    assert not awake.held


def test_disabled_holds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "latency"
    awake = CpuAwake(enabled=False, path=str(path))
    with awake.hold():
        assert not awake.held
    assert not path.exists()


def test_without_the_device_it_warns_once_and_moves_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    awake = CpuAwake(path=str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, "sessmob.cpu_awake"):
        for _ in range(3):
            with awake.hold():
                assert not awake.held
    warnings = [r for r in caplog.records if "cannot keep the CPUs awake" in r.getMessage()]
    assert len(warnings) == 1
    assert "No such file" in warnings[0].getMessage()


@pytest.mark.skipif(os.geteuid() != 0, reason="the PM QoS device is root's")
def test_the_kernel_request_is_in_force_while_held() -> None:
    if not os.path.exists(CPU_LATENCY_DEV):
        pytest.skip(f"{CPU_LATENCY_DEV} is missing")
    before = current_cpu_latency_us()
    awake = CpuAwake()
    with awake.hold():
        assert current_cpu_latency_us() == 0
    assert current_cpu_latency_us() == before
