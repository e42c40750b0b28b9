"""`sessmob bench`: the Relocation Manager's move of an echo session, against the raw move.

Scenario `rm-echo-addr` (issue 4): a fresh lan testbed, RMs in ed and id (RmBed), the echo
server on ed (`sessmob.apps.echo serve`) and an importer on id (`--import-only`), the echo
client's verified stream from cn at 10 MB/s each way on one TCP connection to the session
address, then N moves ed -> id -> ed ... through the RM's control socket. Each move's t_Mig and
step timeline come from the move reply. The floor — the raw move (`MovingStream`, the native
helper and pre-built messages, no RM) of one stream at the same rate, N times, on another
fresh lan — is measured in the same run, so `ratio_to_floor` compares numbers from one machine
state.

The client is the echo client's stream (`StreamEndpoint` with the pattern seed on both
directions, TCP_NODELAY, as `sessmob.apps.echo client` runs it) but in this process, with its
socket made in cn: so that its longest receive gap can be read per move (the client process
reports only one for its whole run).

Output: the `bench tcp` table and the JSON schema of netns_testbed.bench, extended (see
docs/testbed.md, "The RM benchmark").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from sessmob.netns import entered, socket_in
from sessmob.rm.config import CPUS_AWAKE
from sessmob.rm.control import ControlError

from . import coldprobe
from .bench import SCENARIOS, SCHEMA_VERSION, _intact, _ms, machine_info, print_table, run_scenario
from .counters import CnCounters, read_tcp_counters
from .rmbed import RmBed
from .scenario import summarize
from .stream import StreamEndpoint
from .topology import Testbed, build_lan

NAME = "rm-echo-addr"
RATE = 10e6  # bytes/s each way, as the issue says
ECHO_PORT = 7000  # sessmob.apps.echo's default port
FLOOR = "ipv6-10MBps"  # the raw-move scenario of `bench tcp` with the same traffic
TARGETS = {"t_mig_median_ms": 2.0, "t_mig_p99_ms": 5.0, "ratio_to_floor": 1.5}


def _cn_counters(tb: Testbed) -> dict[str, int]:
    with entered(tb.ns("cn")):
        return read_tcp_counters()


def _start_echo(bed: RmBed) -> tuple[str, str]:
    """Echo server on ed, importer on id; (session id, session address) once it is there."""
    base = [sys.executable, "-m", "sessmob.apps.echo", "serve", "--port", str(ECHO_PORT)]
    bed.start_importer("ed", [*base, "--rm-socket", os.path.join(bed.state_dir("ed"), "app.sock")])
    bed.start_importer(
        "id",
        [*base, "--rm-socket", os.path.join(bed.state_dir("id"), "app.sock"), "--import-only"],
    )
    s = bed.wait_session("ed")
    return s["session"], s["addresses"][0].split("/")[0]


def _connect_client(tb: Testbed, addr: str, rate: float) -> StreamEndpoint:
    sock = socket_in(tb.ns("cn"), socket.AF_INET6)
    try:
        sock.settimeout(5.0)
        sock.connect((addr, ECHO_PORT))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ep = StreamEndpoint(sock, tx_seed=1, rx_seed=1, rate=rate)
    except BaseException:
        sock.close()
        raise
    ep.start()
    return ep


def _wait_progress(ep: StreamEndpoint, nbytes: int, timeout: float = 5.0) -> None:
    start = ep.stats.rx_bytes
    deadline = time.monotonic() + timeout
    while ep.stats.rx_bytes - start < nbytes:
        st = ep.stats
        if st.error:
            raise RuntimeError(f"echo stream failed before the first move: {st.error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"echo stream did not progress {nbytes} B within {timeout:g} s")
        time.sleep(0.005)


def run_rm_echo(
    runs: int,
    interval: float,
    rate: float = RATE,
    log: Any = None,
    *,
    cpus_awake: str = "during-moves",
) -> tuple[dict[str, Any], list[str]]:
    """Build a lan with RMs and the echo session, move it `runs` times; (its JSON, problems)."""
    t_mig: list[float] = []
    wall: list[float] = []
    steps: dict[str, list[float]] = {}
    importer: dict[str, list[float]] = {}
    stalls: list[float] = []
    baseline: list[float] = []
    problems: list[str] = []
    moves = f'[moves]\nkeep_cpus_awake = "{cpus_awake}"\n'
    with build_lan() as tb, RmBed(tb, extra={"ed": moves, "id": moves}) as bed:
        sid, addr = _start_echo(bed)
        before = _cn_counters(tb)
        ep = _connect_client(tb, addr, rate)
        try:
            bed.wait_flows("ed", "tcp")
            _wait_progress(ep, 64 * 1024)
            for _ in range(min(20, runs)):
                ep.mark()
                time.sleep(interval)
                baseline.append(ep.stats.max_rx_gap_s * 1e3)
            where = "ed"
            for i in range(runs):
                to = "id" if where == "ed" else "ed"
                ep.mark()
                t0 = time.perf_counter()
                try:
                    r = bed.move(where, sid, to)
                except ControlError as e:
                    problems.append(f"move {i + 1} {where}->{to} failed at {e.step}: {e.message}")
                    if len(problems) >= 10 or ep.stats.error:
                        break
                    time.sleep(interval)
                    continue
                wall.append((time.perf_counter() - t0) * 1e3)
                where = to
                t_mig.append(float(r["t_mig_ms"]))
                for s in r.get("steps") or []:
                    steps.setdefault(str(s["step"]), []).append(float(s["ms"]))
                for k, v in (r.get("importer_steps") or {}).items():
                    if isinstance(v, int | float):
                        importer.setdefault(k.removesuffix("_ms"), []).append(float(v))
                time.sleep(interval)
                stalls.append(ep.stats.max_rx_gap_s * 1e3)
                if ep.stats.error:
                    break
                if log and (i + 1) % 50 == 0:
                    print(f"  {NAME}: {i + 1}/{runs} moves", file=log, flush=True)
        finally:
            res = ep.finish(20.0, check=False)
            ep.close()
            ep.socket.close()
        after = _cn_counters(tb)
    if res.error:
        problems.append(f"echo client: {res.error}")
    elif not res.eof:
        problems.append("echo client: no EOF from the echo server")
    counters = CnCounters.between(before, after)
    stall = summarize(stalls)
    base = summarize(baseline)
    return {
        "runs": len(t_mig),
        "kind": "ipv6",
        "flows": 1,
        "rate_bytes_per_s": rate,
        "t_mig_ms": _ms([v / 1e3 for v in t_mig]),
        "phases_ms": {k: _ms([v / 1e3 for v in vals]) for k, vals in steps.items()},
        "importer_phases_ms": {k: _ms([v / 1e3 for v in vals]) for k, vals in importer.items()},
        "move_wall_ms": _ms([v / 1e3 for v in wall]),
        "cn_stall_ms": {k: round(v, 3) for k, v in stall.items()} if stalls else None,
        "baseline_cn_stall_ms": {k: round(v, 3) for k, v in base.items()} if baseline else None,
        "stall_ratio_to_baseline": round(stall["median"] / base["median"], 3)
        if stalls and base["median"] > 0
        else None,
        "bytes_lost": max(0, res.tx_bytes - res.rx_bytes),
        "bytes_duplicated": max(0, res.rx_bytes - res.tx_bytes),
        "bytes_verified": res.tx_bytes + res.rx_bytes,
        "problems": problems[:10],
        "cn_resets": counters.resets,
        "cn_rto_count": counters.rto,
        "cn_tlp_count": counters.tlp,
        "cn_retrans_segs": counters.retrans_segs,
    }, problems


def run_floor(runs: int, interval: float, log: Any = None) -> dict[str, Any]:
    """The raw move of one IPv6 stream at the same rate (`bench tcp`'s ipv6-10MBps)."""
    return run_scenario(SCENARIOS[FLOOR], runs, interval, log)


def run(
    runs: int, interval: float, log: Any = sys.stderr, *, cpus_awake: str = "during-moves"
) -> dict[str, Any]:
    """Both halves of `rm-echo-addr`; the scenario's JSON."""
    print(f"bench rm: {NAME}, {runs} moves through the RMs ...", file=log, flush=True)
    r, problems = run_rm_echo(runs, interval, RATE, log, cpus_awake=cpus_awake)
    r["keep_cpus_awake"] = cpus_awake
    print(f"bench rm: floor (raw move, {FLOOR}), {runs} moves ...", file=log, flush=True)
    floor: dict[str, Any] | None
    try:
        floor = run_floor(runs, interval, log)
    except Exception as e:  # the floor's own verification failed: say so, keep the RM numbers
        problems.append(f"floor: {type(e).__name__}: {e}")
        r["problems"] = problems[:10]
        floor = None
    fm = floor["t_mig_ms"] if floor else None
    r["floor_ms"] = fm
    r["ratio_to_floor"] = (
        round(r["t_mig_ms"]["median"] / fm["median"], 3)
        if fm and r["runs"] and fm["median"] > 0
        else None
    )
    r["floor"] = floor
    r["targets"] = dict(TARGETS)
    r["python_after_pause"] = coldprobe.measure()
    return r


def _writable(path: str) -> str | None:
    """Why `path` cannot be written (checked before minutes of measuring), or None."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.isdir(d):
        return f"directory {d} does not exist"
    if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="sessmob bench",
        description=f"Benchmark the Relocation Manager (needs root). Scenario {NAME}: in a "
        "fresh namespace testbed, RMs on ed and id, the migratable echo server on ed and a "
        "verifying echo client in cn streaming 10 MB/s each way on one TCP connection; the "
        "session moves ed -> id -> ed ... N times through the RM. Its t_Mig and step times "
        "come from each move's timeline; the raw move of the same stream (the floor) is "
        "measured N times in the same run. Prints medians, p99 and whether the targets "
        "(t_Mig <= 2 ms median, <= 5 ms p99, <= 1.5x the floor) are met.",
        epilog="Exit status: 0 done (missed speed targets are reported, not failed); 1 bytes "
        "lost or duplicated, a CN reset, a failed move or another problem; 2 usage error or "
        "not root.",
        allow_abbrev=False,
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=200,
        metavar="N",
        help="moves through the RM, and as many raw moves for the floor (default 200)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument(
        "--interval-ms",
        type=float,
        default=30.0,
        metavar="MS",
        help="time after each move, over which the CN stall is measured (default 30)",
    )
    ap.add_argument(
        "--cpus-awake",
        choices=CPUS_AWAKE,
        default="during-moves",
        metavar="WHEN",
        help="the RMs' [moves] keep_cpus_awake: during-moves (their default), always or never "
        "(idle CPUs poll instead of sleeping while it holds)",
    )
    return ap


MAX_RUNS = 100_000


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 1 <= args.runs <= MAX_RUNS:
        ap.error(f"--runs must be between 1 and {MAX_RUNS}, not {args.runs}")
    if not 0 <= args.interval_ms <= 10_000:
        ap.error(f"--interval-ms must be between 0 and 10000, not {args.interval_ms:g}")
    if args.json is not None:
        why = _writable(args.json)
        if why:
            ap.error(f"--json: {why}")
    if os.geteuid() != 0:
        print("sessmob bench: needs root (network namespaces, TCP_REPAIR)", file=sys.stderr)
        return 2
    r = run(args.runs, args.interval_ms / 1e3, cpus_awake=args.cpus_awake)
    results = {NAME: r}
    print_table({**results, **({f"floor: {FLOOR}": r["floor"]} if r["floor"] else {})}, sys.stdout)
    fm = r["floor_ms"]
    print(
        "\nfloor (raw move, same rate, same run): t_Mig median/p99 "
        + (f"{fm['median']:.3f}/{fm['p99']:.3f} ms" if fm else "not measured")
        + f"; ratio to floor {r['ratio_to_floor']} (target <= {TARGETS['ratio_to_floor']})"
    )
    if r["importer_phases_ms"]:
        parts = ", ".join(f"{k} {v['median']:.3f}" for k, v in r["importer_phases_ms"].items())
        print(f"on the importing device (median ms): {parts}")
    cp = r["python_after_pause"]
    print(
        f"this machine: Python paused {cp['pause_ms']:g} ms runs {cp['ratio']}x slower than"
        f" warm ({cp['workload']}: {cp['warm_us']} us warm, {cp['after_pause_us']} us after"
        " the pause); every step inside the window is such code, in a process just woken"
    )
    for p in r["problems"]:
        print(f"problem: {p}")
    if args.json:
        doc = {"schema_version": SCHEMA_VERSION, "machine": machine_info(), "scenarios": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 0 if _intact(r) else 1


if __name__ == "__main__":
    sys.exit(main())
