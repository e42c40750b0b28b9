"""How much slower Python runs right after a pause, on this machine.

Inside the freeze window every step is Python in a process that has just been woken: the
application after the RM's suspend, the importing RM after the transfer, and so on. On this
project's VM (a PVM guest: shadow page tables, and a kernel that packs tasks onto one vCPU)
such code runs many times slower than the same code run back to back, so this factor, not the
RM's logic alone, sets its t_Mig. The probe measures it with a fixed workload — decoding a
small exchange document, as the importing RM does inside the window — run warm (back to back)
and after a sleep, and `sessmob bench` records it next to its results so that numbers from
different machines can be compared.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

from sessmob.exchange import AppState, ExchangeDoc, FlowState, UdpState, decode, encode

PAUSE = 0.01  # seconds between the cold runs: about the gap between two steps of a move
RUNS = 100


def _sample() -> bytes:
    udp = UdpState(
        family=socket.AF_INET6,
        local=("2001:db8:1::10", 7000),
        remote=None,
        options={"sndbuf": 212992, "rcvbuf": 212992, "tos": 0},
        queued=[("2001:db8:1::1", 40000, b"x" * 64)],
    )
    doc = ExchangeDoc(
        session_id="s-probe",
        session_type="echo",
        source="ed",
        addresses=["2001:db8:1::10/128"],
        apps=[AppState("echo", b"\x81" * 100)],
        flows=[FlowState("u0", "udp", udp=udp)],
    )
    return encode(doc)


def _times_us(data: bytes, pause: float, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter_ns()
        decode(data)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def measure(runs: int = RUNS, pause: float = PAUSE) -> dict[str, Any]:
    """{"workload", "warm_us", "after_pause_us", "pause_ms", "ratio"} (medians)."""
    data = _sample()
    _times_us(data, 0, 20)  # first use: imports, caches
    warm = statistics.median(_times_us(data, 0, runs))
    cold = statistics.median(_times_us(data, pause, runs))
    return {
        "workload": "exchange.decode of a small document (one application, one UDP flow)",
        "warm_us": round(warm, 1),
        "after_pause_us": round(cold, 1),
        "pause_ms": pause * 1e3,
        "ratio": round(cold / warm, 1) if warm > 0 else None,
    }
