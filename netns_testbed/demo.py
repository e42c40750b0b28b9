"""`python -m netns_testbed demo`: the README's first command.

Builds the `lan` testbed, streams 10 MB/s each way between the CN and a connection on ed,
moves that connection ed <-> id ten times with the raw move, prints the per-phase timing table
of every move, verifies every byte in both directions, and tears everything down.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .rawmove import PHASES
from .scenario import FAMILIES, MovingStream, summarize
from .topology import build_lan


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:8.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m netns_testbed demo",
        description="Move a live, verified TCP stream between two namespaces (needs root).",
    )
    ap.add_argument("--moves", type=int, default=10, help="number of moves (default 10)")
    ap.add_argument("--kind", choices=sorted(FAMILIES), default="ipv6", help="default ipv6")
    ap.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="MB/s each way; 0 = idle, negative = saturated (default 10)",
    )
    args = ap.parse_args(argv)
    if args.moves < 1:
        ap.error("--moves must be at least 1")
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, TCP_REPAIR)", file=sys.stderr)
        return 2
    rate = None if args.rate < 0 else args.rate * 1e6
    what = "saturated" if rate is None else f"{args.rate:g} MB/s each way"
    with build_lan() as tb:
        print(f"testbed {tb.prefix}: cn, ed, id on one bridge; session address ", end="")
        print(tb.session_addr6 if args.kind == "ipv6" else tb.session_addr4)
        with MovingStream(tb, kind=args.kind, rate=rate) as ms:
            assert ms.peer is not None
            print(f"{args.kind} stream CN <-> ed, {what}, every byte verified\n")
            ms.wait_progress(64 * 1024 if rate != 0 else 0)
            header = f"{'move':>9} " + " ".join(f"{p:>8}" for p in PHASES)
            print("per-phase time in microseconds (t_Mig = isolate .. announce)")
            print(f"{header} {'t_Mig':>8} {'frz->rst':>8} {'queued':>8} {'CN stall':>9}")
            stalls: list[float] = []
            for _ in range(args.moves):
                src = ms.where
                ms.peer.mark()
                t = ms.move()
                time.sleep(0.05)
                stall = ms.peer.stats()["max_rx_gap_ms"]
                stalls.append(stall)
                cells = " ".join(_us(t.phases[p]) for p in PHASES)
                print(
                    f"{src + '->' + ms.where:>9} {cells} {_us(t.t_mig)} "
                    f"{_us(t.freeze_to_restored)} {t.queued_bytes:8d} {stall:7.1f}ms"
                )
            fin = ms.finish()
            tm = summarize([t.t_mig * 1e3 for t in ms.timings])
            fr = summarize([t.freeze_to_restored * 1e3 for t in ms.timings])
            st = summarize(stalls)
    print(
        f"\nt_Mig median {tm['median']:.3f} ms, max {tm['max']:.3f} ms; "
        f"freeze->restored median {fr['median']:.3f} ms; "
        f"CN stall median {st['median']:.1f} ms, max {st['max']:.1f} ms"
    )
    print(
        f"verified {fin.local.tx_bytes} B ed/id->CN and {fin.local.rx_bytes} B CN->ed/id: "
        f"lost {fin.bytes_lost}, duplicated {fin.bytes_duplicated}; CN resets "
        f"{fin.counters.resets}, RTOs {fin.counters.rto}, loss probes {fin.counters.tlp}, "
        f"retransmitted segments {fin.counters.retrans_segs}"
    )
    print("testbed torn down")
    ok = fin.bytes_lost == 0 and fin.bytes_duplicated == 0 and fin.counters.resets == 0
    return 0 if ok else 1
