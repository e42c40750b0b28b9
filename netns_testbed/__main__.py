"""``python -m netns_testbed``: bring testbeds up and down by hand, look into them, benchmark.

up [TOPOLOGY] [--prefix P] [--hold] [-j]   build (default: lan) and print hosts/addresses
down [PREFIX ...] [--all]                  remove runs (default: stale runs and orphans)
list [-j]                                  show runs and whether their owner is alive
exec PREFIX HOST -- CMD ...                run CMD inside a host's namespace
demo [--moves N] [--kind K] [--rate MB/s]   move a live verified stream ed <-> id, print timings
bench ...                                  benchmarks (netns_testbed.bench)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from netns_testbed import runs
from netns_testbed.topology import TOPOLOGIES, Testbed, TestbedError


def _describe(tb: Testbed, owner_pid: int) -> dict[str, Any]:
    return {
        "prefix": tb.prefix,
        "topology": tb.topology,
        "owner_pid": owner_pid,
        "namespaces": tb.namespaces,
        "hosts": {name: asdict(h) for name, h in tb.hosts.items()},
        "session": {
            "addr6": tb.session_addr6,
            "prefixlen6": tb.session_prefixlen6,
            "addr4": tb.session_addr4,
            "prefixlen4": tb.session_prefixlen4,
        },
    }


def _print_testbed(tb: Testbed, owner_pid: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_describe(tb, owner_pid)), flush=True)
        return
    print(f"{tb.prefix}  topology={tb.topology}  owner_pid={owner_pid}")
    for h in tb.hosts.values():
        print(
            f"  {h.name:<3} {h.netns:<14} {h.ifname} ({h.mac})  "
            f"{h.addr6}/{h.prefixlen6}  {h.addr4}/{h.prefixlen4}"
        )
    print(
        f"  session address (not assigned): {tb.session_addr6}/{tb.session_prefixlen6}  "
        f"{tb.session_addr4}/{tb.session_prefixlen4}"
    )
    print(f"  enter a host: python -m netns_testbed exec {tb.prefix} cn -- bash", flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    build = TOPOLOGIES[args.topology]
    if args.hold:
        # SIGINT raises KeyboardInterrupt; SIGTERM/SIGHUP become SystemExit (topology installs
        # that). Either may arrive at any point, even during the build: the `with` (or the
        # build itself) tears down, and we exit 0 once everything is gone.
        prefix = "testbed"
        try:
            with build(args.prefix) as tb:
                prefix = tb.prefix
                _print_testbed(tb, os.getpid(), args.json)
                if not args.json:
                    print("holding; Ctrl-C or SIGTERM tears down", flush=True)
                while True:
                    signal.pause()
        except (KeyboardInterrupt, SystemExit):
            pass
        if not args.json:
            print(f"{prefix} torn down", flush=True)
        return 0
    owner = args.owner if args.owner is not None else os.getppid()
    if not runs.owner_alive(owner, None):
        print(f"error: owner process {owner} does not exist", file=sys.stderr)
        return 1
    tb = build(args.prefix)
    try:
        tb.detach(owner)
    except BaseException:
        tb.teardown()
        raise
    _print_testbed(tb, owner, args.json)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    rc = 0
    if args.all and args.prefixes:
        print("error: give prefixes or --all, not both", file=sys.stderr)
        return 2
    targets: list[tuple[str, str]] = []  # (prefix, why)
    if args.prefixes:
        known = {r.prefix: r for r in runs.list_runs()}
        for raw in args.prefixes:
            try:
                prefix = runs.normalize_prefix(raw)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                rc = 1
                continue
            rec = known.get(prefix)
            if rec is None and not runs.namespaces_with_prefix(prefix):
                print(f"{prefix}: no such run", file=sys.stderr)
                rc = 1
                continue
            targets.append((prefix, rec.state if rec else "unrecorded"))
    else:
        selected = runs.list_runs() if args.all else runs.stale_runs()
        targets = [(r.prefix, r.state) for r in selected]
    for prefix, why in targets:
        try:
            removed = runs.remove_run(prefix)
        except runs.RunError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 1
            continue
        print(f"removed {prefix} ({why}): {' '.join(removed) or 'no namespaces left'}")
    if not targets and rc == 0:
        print("nothing to remove")
    return rc


def cmd_list(args: argparse.Namespace) -> int:
    recs = runs.list_runs()
    if args.json:
        out = []
        for r in recs:
            d = r.to_json()
            d["state"] = r.state
            d["existing_namespaces"] = runs.namespaces_with_prefix(r.prefix)
            out.append(d)
        print(json.dumps(out))
        return 0
    if not recs:
        print("no testbed runs")
        return 0
    now = time.time()
    print(f"{'PREFIX':<12} {'TOPOLOGY':<9} {'OWNER':>7} {'STATE':<7} {'AGE':>7}  NAMESPACES")
    for r in recs:
        age = f"{now - r.created:.0f}s" if r.created else "-"
        owner = str(r.owner_pid) if r.owner_pid else "-"
        names = " ".join(runs.namespaces_with_prefix(r.prefix)) or "(none)"
        print(f"{r.prefix:<12} {r.topology:<9} {owner:>7} {r.state:<7} {age:>7}  {names}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("error: no command given (exec PREFIX HOST -- CMD ...)", file=sys.stderr)
        return 2
    try:
        prefix = runs.normalize_prefix(args.prefix)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ns = prefix + args.host
    if ns not in runs.list_netns():
        have = [n[len(prefix) :] for n in runs.namespaces_with_prefix(prefix)]
        print(
            f"error: no namespace {ns!r}"
            + (f" (run {prefix} has: {', '.join(have)})" if have else ""),
            file=sys.stderr,
        )
        return 2
    sys.stdout.flush()
    try:
        os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])
    except OSError as e:
        print(f"error: cannot run 'ip netns exec': {e}", file=sys.stderr)
        return 127
    return 0  # not reached


def cmd_delegate(module: str, argv: list[str]) -> int:
    """Hand the rest of the command line to `module.main(argv)` (demo, bench)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"error: {module} is not available: {e}", file=sys.stderr)
        return 2
    return int(mod.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m netns_testbed",
        description="sessmob network-namespace testbeds: build, inspect, remove, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="build a topology",
        description="Build a topology and print its prefix, hosts and addresses. Without --hold "
        "the run is left up and owned by the calling process (your shell); 'down' removes it "
        "once that process is gone.",
    )
    up.add_argument("topology", nargs="?", default="lan", choices=sorted(TOPOLOGIES))
    up.add_argument("--prefix", help="run prefix such as sm3fa9c1- (default: random)")
    up.add_argument(
        "--hold",
        action="store_true",
        help="stay in the foreground until Ctrl-C/SIGTERM, then tear down",
    )
    up.add_argument(
        "--owner", type=int, metavar="PID", help="owner pid to record (default: the parent process)"
    )
    up.add_argument("-j", "--json", action="store_true", help="print JSON")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser(
        "down",
        help="remove runs",
        description="Remove the named runs (processes in their namespaces are killed). Without "
        "PREFIX, remove runs whose owner process is gone and orphaned sm??????- namespaces.",
    )
    down.add_argument("prefixes", nargs="*", metavar="PREFIX")
    down.add_argument(
        "--all", action="store_true", help="remove every sessmob testbed run, alive or not"
    )
    down.set_defaults(func=cmd_down)

    ls = sub.add_parser(
        "list",
        help="show runs",
        description="Show runs: prefix, topology, owner, alive/stale/orphan, namespaces.",
    )
    ls.add_argument("-j", "--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)

    ex = sub.add_parser(
        "exec",
        help="run a command in a host's namespace",
        description="Run CMD inside HOST's namespace of run PREFIX; exits with CMD's status.",
    )
    ex.add_argument("prefix", metavar="PREFIX")
    ex.add_argument("host", metavar="HOST", help="cn, ed, id (or br for the bridge)")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    ex.set_defaults(func=cmd_exec)

    sub.add_parser(
        "demo",
        help="move a live verified TCP stream between ed and id (see 'demo --help')",
        add_help=False,
        description="Dispatched to netns_testbed.demo.",
    )
    sub.add_parser(
        "bench",
        help="run benchmarks (see 'bench --help')",
        add_help=False,
        description="Dispatched to netns_testbed.bench.",
    )
    return parser


DELEGATED = {"demo": "netns_testbed.demo", "bench": "netns_testbed.bench"}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        return cmd_delegate(DELEGATED[args_list[0]], args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return int(args.func(args))
    except (TestbedError, runs.RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
