"""Keep this machine's CPUs out of sleep states while a move runs (PM QoS).

Every step of the freeze window runs in a process that was just woken. When the CPU it runs
on had gone idle, it first has to leave its idle state; on a virtual machine without halt
polling that is a trip through the hypervisor, and the step then starts slower still. Holding
a CPU latency request of 0 µs (`/dev/cpu_dma_latency`, the kernel's PM QoS interface) makes
idle CPUs poll instead, for as long as the request is held: the RM holds it from the
reservation until the window is over, and drops it at once afterwards, since polling CPUs burn
power (and a VM's host time). Measured in docs/architecture.md.

The request is the open file: closing it (or the process ending) withdraws it, so a crash
cannot leave the machine polling.
"""

from __future__ import annotations

import logging
import os
import struct

__all__ = ["CPU_LATENCY_DEV", "CpuAwake", "Hold", "current_cpu_latency_us"]

CPU_LATENCY_DEV = "/dev/cpu_dma_latency"

_log = logging.getLogger("sessmob.cpu_awake")


class CpuAwake:
    """Counted holds on one 0 µs CPU latency request: the first `hold()` opens the request,
    the release of the last hold withdraws it. Where the request cannot be made (no such
    device, not root) it warns once and holds nothing: moves work without it, only slower."""

    def __init__(self, enabled: bool = True, path: str = CPU_LATENCY_DEV) -> None:
        self.enabled = enabled
        self.path = path
        self._count = 0
        self._fd: int | None = None
        self._warned = False

    @property
    def held(self) -> bool:
        """Whether the request is in force."""
        return self._fd is not None

    def hold(self) -> Hold:
        """A hold until its `release()` (idempotent); also a context manager."""
        if not self.enabled:
            return Hold(None)
        self._count += 1
        if self._count == 1:
            self._fd = self._open()
        return Hold(self)

    def close(self) -> None:
        """Withdraw the request whatever holds remain (the RM is stopping)."""
        self._count = 0
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _drop(self) -> None:
        if self._count == 0:  # closed meanwhile
            return
        self._count -= 1
        if self._count == 0:
            self.close()

    def _open(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            self._warn(e)
            return None
        try:
            os.write(fd, struct.pack("=i", 0))
        except OSError as e:
            os.close(fd)
            self._warn(e)
            return None
        return fd

    def _warn(self, e: OSError) -> None:
        if not self._warned:
            self._warned = True
            _log.warning("cannot keep the CPUs awake during moves (%s: %s); moves run without it",
                         self.path, e.strerror or e)  # fmt: skip


class Hold:
    """One holder's share of the request."""

    def __init__(self, owner: CpuAwake | None) -> None:
        self._owner = owner

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._drop()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def current_cpu_latency_us(path: str = CPU_LATENCY_DEV) -> int:
    """The CPU latency limit in force now, over all requests on the machine (µs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 4)
    finally:
        os.close(fd)
    if len(data) != 4:
        raise OSError(f"{path}: read {len(data)} bytes, expected 4")
    return int(struct.unpack("=i", data)[0])
