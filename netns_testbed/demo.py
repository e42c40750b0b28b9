"""`python -m netns_testbed demo`: the README's first command.

Default: the framework itself. Builds the `lan` testbed, starts a Relocation Manager in ed and
in id, the migratable echo server on ed (an importer on id) and an echo client in cn that
sends continuously and checks every echoed byte; moves the echo session ed <-> id with
`session move` through the RM's control interface, prints each move's timeline (the steps of
the paper's Fig. 4 and t_Mig), then the client's verdict, and tears everything down.

`--raw`: the floor underneath: the same kind of stream moved by the native helper alone (no
RM), with the per-phase table of every move.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .rawmove import PHASES
from .rmbed import RmBed
from .scenario import FAMILIES, MovingStream, summarize
from .topology import build_lan


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:8.0f}"


RM_STEPS = (
    "CheckPreconditions",
    "DoPresignaling",
    "Suspend",
    "GetState",
    "InitiateSessionTransfer+ActivateSession",
    "Shutdown",
)
_SHORT = {"InitiateSessionTransfer+ActivateSession": "Transfer+Activate"}


def rm_demo(moves: int, rate_mb: float) -> int:
    """Move an echo session between two RMs while a client in cn verifies every byte."""
    py = sys.executable
    with build_lan() as tb, RmBed(tb) as bed:
        print(f"testbed {tb.prefix}: RMs on ed and id, echo server on ed, client in cn")
        sock = f"{bed.state_dir('ed')}/app.sock"
        bed.start_importer("ed", [py, "-m", "sessmob.apps.echo", "serve", "--rm-socket", sock])
        sock = f"{bed.state_dir('id')}/app.sock"
        bed.start_importer(
            "id", [py, "-m", "sessmob.apps.echo", "serve", "--rm-socket", sock, "--import-only"]
        )
        s = bed.wait_session("ed")
        sid, addr = s["session"], s["addresses"][0].split("/")[0]
        client = bed.start_app(
            "cn",
            [py, "-m", "sessmob.apps.echo", "client", "--connect", addr, "7000", "--json",
             "--rate", str(int(rate_mb * 1e6)), "--tcp", "1"],
        )  # fmt: skip
        try:
            bed.wait_flows("ed", "tcp")
        except TimeoutError as e:
            print(f"demo: the client's connection never joined the session: {e}", file=sys.stderr)
            return 1
        time.sleep(0.5)
        print(f"session {sid} on {addr}, client sending {rate_mb:g} MB/s and checking the echo\n")
        print("per-step time in ms (t_Mig = Suspend .. the importer's activation reply)")
        heads = [_SHORT.get(x, x) for x in RM_STEPS]
        print(f"{'move':>9} " + " ".join(f"{h:>18}" for h in heads) + f" {'t_Mig':>8}")
        where, t_migs = "ed", []
        for _ in range(moves):
            to = "id" if where == "ed" else "ed"
            r = bed.move(where, sid, to)
            ms = {x["step"]: x["ms"] for x in r["steps"]}
            cells = " ".join(f"{ms.get(x, float('nan')):18.3f}" for x in RM_STEPS)
            print(f"{where + '->' + to:>9} {cells} {r['t_mig_ms']:8.3f}")
            t_migs.append(r["t_mig_ms"])
            where = to
            time.sleep(0.2)
        client.terminate()
        out, _ = client.communicate(timeout=30)
        err = bed.stderr_of(client)
        rep = json.loads(out.decode().strip().splitlines()[-1]) if out else {}
    tm = summarize(t_migs)
    print(f"\nt_Mig median {tm['median']:.3f} ms, max {tm['max']:.3f} ms over {moves} moves")
    if not rep:
        print(f"demo: the client reported nothing: {err}", file=sys.stderr)
        return 1
    print(
        f"client: sent {rep['tx_bytes']} B, got {rep['rx_bytes']} B back verified, "
        f"longest gap {rep['max_gap_ms']:.1f} ms, errors {rep['errors'] or 'none'}"
    )
    print("testbed torn down")
    return 0 if rep.get("ok") and rep["tx_bytes"] == rep["rx_bytes"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m netns_testbed demo",
        description="Move a live, verified TCP stream between two namespaces (needs root).",
    )
    ap.add_argument("--moves", type=int, default=10, help="number of moves (default 10)")
    ap.add_argument("--raw", action="store_true", help="the raw move (native helper only, no RM)")
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
    if not args.raw:
        return rm_demo(args.moves, max(args.rate, 0.1))
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
