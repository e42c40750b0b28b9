"""A live verified stream between ed and the CN, moved back and forth by the raw move.

Shared by the demo, the benchmark and the netns tests so that all three measure the same
thing: an in-process application endpoint on the session address (paused while its socket
moves, then continued on the restored socket) against a CN peer process streaming back.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from sessmob.closing import Closing
from sessmob.netns import socket_in

from .cnpeer import CnPeer, finish_pair
from .counters import CnCounters
from .rawmove import MoveFailed, MoveTiming, RawMover
from .stream import StreamEndpoint, StreamResult
from .topology import Testbed

FAMILIES = {"ipv6": socket.AF_INET6, "ipv4": socket.AF_INET, "v4mapped": socket.AF_INET6}


@dataclass
class Finished:
    """Totals once both ends have closed and verified their halves of the stream."""

    local: StreamResult
    cn: dict[str, Any]
    counters: CnCounters

    @property
    def bytes_lost(self) -> int:
        return max(0, self.local.tx_bytes - self.cn["rx"]) + max(
            0, self.cn["tx"] - self.local.rx_bytes
        )

    @property
    def bytes_duplicated(self) -> int:
        return max(0, self.cn["rx"] - self.local.tx_bytes) + max(
            0, self.local.rx_bytes - self.cn["tx"]
        )


@dataclass
class MovingStream(Closing):
    """One verified bidirectional stream whose connection hops between ed and id.

    kind: "ipv6", "ipv4" or "v4mapped" (an AF_INET6 socket talking IPv4). rate: bytes/s each
    way, None = saturated, 0 = idle.
    """

    tb: Testbed
    kind: str = "ipv6"
    rate: float | None = 10e6
    port: int = 0
    where: str = "ed"
    timings: list[MoveTiming] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in FAMILIES:
            raise ValueError(f"kind must be one of {sorted(FAMILIES)}, not {self.kind!r}")
        v4 = self.kind != "ipv6"
        hosts = self.tb.hosts
        self.mover = RawMover(self.tb, socket.AF_INET if v4 else socket.AF_INET6)
        self.peer: CnPeer | None = None
        self.endpoint: StreamEndpoint | None = None
        try:
            self.mover.place("ed")
            cn_addr = hosts["cn"].addr4 if v4 else hosts["cn"].addr6
            self.peer = CnPeer.start(
                self.tb.ns("cn"),
                cn_addr,
                self.port,
                family=socket.AF_INET if v4 else socket.AF_INET6,
                tx_seed=2,
                rx_seed=1,
                rate=self.rate,
            )
            self.counters_before = self.peer.counters()
            local, remote = self.mover.addr, cn_addr
            if self.kind == "v4mapped":
                local, remote = "::ffff:" + local, "::ffff:" + remote
            sock = socket_in(self.tb.ns("ed"), FAMILIES[self.kind])
            sock.bind((local, 0))
            sock.connect((remote, self.peer.port))
            self.endpoint = StreamEndpoint(sock, tx_seed=1, rx_seed=2, rate=self.rate)
            self.endpoint.start()
        except BaseException:
            self.close()
            raise

    def move(self, fail_at: str | None = None, via_bytes: bool = False) -> MoveTiming:
        """Move the connection to the other device; on failure it stays (and runs) here."""
        assert self.endpoint is not None
        dst = "id" if self.where == "ed" else "ed"
        self.mover.prepare(dst)
        self.endpoint.pause()
        try:
            new, timing = self.mover.move(
                self.endpoint.socket, self.where, dst, fail_at=fail_at, via_bytes=via_bytes
            )
        except MoveFailed:
            self.endpoint.resume()
            raise
        self.endpoint.swap_socket(new)
        self.endpoint.resume()
        self.where = dst
        self.timings.append(timing)
        return timing

    def wait_progress(self, nbytes: int, timeout: float = 5.0) -> None:
        """Block until both directions moved `nbytes` further (the stream really flows)."""
        assert self.endpoint is not None and self.peer is not None
        start_local = self.endpoint.stats.rx_bytes
        start_cn = self.peer.stats()["rx"]
        deadline = time.monotonic() + timeout
        while True:
            local = self.endpoint.stats
            if local.error:
                raise RuntimeError(f"stream failed on the device side: {local.error}")
            cn = self.peer.stats()
            if cn.get("error"):
                raise RuntimeError(f"stream failed on the CN: {cn['error']}")
            if local.rx_bytes - start_local >= nbytes and cn["rx"] - start_cn >= nbytes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"stream did not progress {nbytes} B within {timeout}s: device received "
                    f"{local.rx_bytes - start_local} B, CN received {cn['rx'] - start_cn} B"
                )
            time.sleep(0.002)

    def finish(self, timeout: float = 20.0) -> Finished:
        """Close both directions and verify every byte (raises StreamError on any mismatch)."""
        assert self.endpoint is not None and self.peer is not None
        counters_after = self.peer.counters()
        local, cn = finish_pair(self.endpoint, self.peer, timeout)
        return Finished(local, cn, CnCounters.between(self.counters_before, counters_after))

    def close(self) -> None:
        """Stop both ends and take the session address away, so the testbed can be reused."""
        if self.endpoint is not None:
            self.endpoint.close()
        if self.peer is not None:
            self.peer.close()
        dev = self.mover.devices.get(self.where)
        if dev is not None:
            with contextlib.suppress(OSError):
                dev.addr.delete()
        self.mover.close()


def summarize(values: list[float]) -> dict[str, float]:
    """Median, p99 (nearest rank) and max of a non-empty list."""
    if not values:
        return {"median": math.nan, "p99": math.nan, "max": math.nan}
    s = sorted(values)
    n = len(s)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    p99 = s[max(0, math.ceil(0.99 * n) - 1)]
    return {"median": median, "p99": p99, "max": s[-1]}
