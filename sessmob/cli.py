"""The `sessmob` command: `sessmob [OPTIONS] OBJECT COMMAND [ARGS]`, as `ip` reads.

    sessmob session list | show S | move S --to DEVICE
    sessmob device list
    sessmob rm --config FILE [--state-dir DIR]      (runs the Relocation Manager)
    sessmob app echo ...                            (the demo application)
    sessmob bench [--runs N] [--json FILE]          (the RM benchmark, in a namespace testbed)

Session and device commands ask the local RM over interface U (``<state-dir>/control.sock``).
`rm`, `app` and `bench` hand their arguments, untouched, to the module that implements them,
imported only then, so that a controller command loads no daemon code.

Exit codes: 0 ok, 1 the operation failed (move refused or failed, no such session, ...),
2 usage error, 3 no relocation manager reachable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sessmob.rm.control import ControlClient, ControlError, ControlUnreachable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_STATE_DIR = "/run/sessmob"
CONTROL_SOCKET = "control.sock"

# Delegated subcommands: object -> module whose main(argv) runs it.
DAEMON_MODULE = "sessmob.rm.daemon"
BENCH_MODULE = "netns_testbed.bench_rm"
APPS = {"echo": "sessmob.apps.echo"}


def state_dir(explicit: str | None) -> str:
    """--state-dir, else $SESSMOB_STATE_DIR, else /run/sessmob."""
    return explicit or os.environ.get("SESSMOB_STATE_DIR") or DEFAULT_STATE_DIR


# ---------------------------------------------------------------------------------------------
# argument parsing


def _common() -> argparse.ArgumentParser:
    # Options accepted after the command too (`sessmob session list -j`); SUPPRESS keeps a
    # command's default from overwriting what was given before the object.
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument(
        "-j",
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable JSON output",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="the RM's state directory (holds control.sock)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    ap = argparse.ArgumentParser(
        prog="sessmob",
        description="Move running service sessions between devices.",
        epilog="Run `sessmob OBJECT --help` for an object's commands. Exit codes: 0 ok, "
        "1 operation failed, 2 usage error, 3 relocation manager unreachable.",
        allow_abbrev=False,
    )
    ap.add_argument(
        "-j", "--json", action="store_true", default=False, help="machine-readable JSON output"
    )
    ap.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help=f"the RM's state directory holding {CONTROL_SOCKET} (default "
        f"$SESSMOB_STATE_DIR or {DEFAULT_STATE_DIR})",
    )
    objects = ap.add_subparsers(dest="object", metavar="OBJECT")

    session = objects.add_parser(
        "session",
        help="service sessions on this device",
        parents=[common],
        description="Service sessions known to the local RM. Without a command: list.",
        allow_abbrev=False,
    )
    cmds = session.add_subparsers(dest="command", metavar="COMMAND")
    cmds.add_parser(
        "list",
        help="list sessions",
        parents=[common],
        allow_abbrev=False,
        description="List the sessions the local RM knows.",
    )
    show = cmds.add_parser(
        "show",
        help="show one session",
        parents=[common],
        allow_abbrev=False,
        description="Show one session in detail.",
    )
    show.add_argument("session", metavar="SESSION", help="session id")
    move = cmds.add_parser(
        "move",
        help="move a session to another device",
        parents=[common],
        allow_abbrev=False,
        description="Move SESSION to DEVICE and print the migration's timeline: each step of "
        "the move with its duration, and t_Mig (Suspend on this device until the session "
        "runs on DEVICE). On failure the session keeps running here and the exit code is 1.",
    )
    move.add_argument("session", metavar="SESSION", help="session id")
    move.add_argument(
        "--to",
        dest="device",
        metavar="DEVICE",
        required=True,
        help="the importing device (see `sessmob device list`)",
    )

    device = objects.add_parser(
        "device",
        help="devices sessions can move to",
        parents=[common],
        allow_abbrev=False,
        description="Devices the local RM can move sessions to. Without a command: list.",
    )
    dcmds = device.add_subparsers(dest="command", metavar="COMMAND")
    dcmds.add_parser(
        "list",
        help="list devices",
        parents=[common],
        allow_abbrev=False,
        description="List the devices the local RM knows.",
    )

    # Listed for --help; main() hands their arguments over before argparse sees them.
    objects.add_parser(
        "rm",
        help="run this device's Relocation Manager (foreground); "
        "`sessmob rm --help` for its options",
        add_help=False,
    )
    objects.add_parser(
        "app", help="run a migratable application: " + ", ".join(sorted(APPS)), add_help=False
    )
    objects.add_parser(
        "bench",
        help="benchmark RM moves against the raw move in a namespace testbed (root); "
        "`sessmob bench --help` for its options",
        add_help=False,
    )
    return ap


def _split_delegated(argv: list[str]) -> tuple[str, list[str], str | None] | None:
    """(object, its arguments, global --state-dir) when the object is `rm`, `app` or `bench`."""
    i, sdir = 0, None
    while i < len(argv):
        a = argv[i]
        if a in ("-j", "--json"):
            i += 1
        elif a == "--state-dir" and i + 1 < len(argv):
            sdir = argv[i + 1]
            i += 2
        elif a.startswith("--state-dir="):
            sdir = a.split("=", 1)[1]
            i += 1
        else:
            break
    if i < len(argv) and argv[i] in ("rm", "app", "bench"):
        return argv[i], argv[i + 1 :], sdir
    return None


# ---------------------------------------------------------------------------------------------
# delegated objects


def _run_module(module: str, what: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(
            f"sessmob: {what} is not available in this installation: cannot import {module} ({e})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    entry = getattr(mod, "main", None)
    if not callable(entry):
        print(f"sessmob: {what}: {module} has no main(argv)", file=sys.stderr)
        return EXIT_FAILED
    try:
        rc = entry(argv)
    except SystemExit as e:  # its argparse: --help (0) or a usage error (2)
        rc = e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_FAILED)
    return int(rc) if isinstance(rc, int) else EXIT_OK


def _delegate(obj: str, argv: list[str], sdir: str | None) -> int:
    if obj == "rm":
        if sdir is not None and not any(
            a == "--state-dir" or a.startswith("--state-dir=") for a in argv
        ):
            argv = [*argv, "--state-dir", sdir]
        return _run_module(DAEMON_MODULE, "the relocation manager (sessmob rm)", argv)
    if obj == "bench":  # runs its own RMs in a testbed: a --state-dir given has no say
        return _run_module(BENCH_MODULE, "the benchmark (sessmob bench)", argv)
    usage = f"usage: sessmob app {{{','.join(sorted(APPS))}}} [ARGS ...]"
    if not argv or argv[0] in ("-h", "--help"):
        stream = sys.stdout if argv else sys.stderr
        print(usage, file=stream)
        print(
            "\nMigratable applications; `sessmob app NAME --help` for one's options.", file=stream
        )
        return EXIT_OK if argv else EXIT_USAGE
    name = argv[0]
    if name not in APPS:
        print(usage, file=sys.stderr)
        print(
            f"sessmob app: unknown application {name!r} (known: {', '.join(sorted(APPS))})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _run_module(APPS[name], f"the {name} application (sessmob app {name})", argv[1:])


# ---------------------------------------------------------------------------------------------
# output


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list | tuple):
        return ",".join(_cell(x) for x in v) if v else "-"
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":"))
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as aligned columns with upper-case headers (columns default to the rows' keys)."""
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _ms(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) and not isinstance(v, bool) else _cell(v)


def format_timeline(tl: dict[str, Any]) -> str:
    """The move's steps with their durations in ms, then t_Mig (and the importer's steps)."""
    steps = tl.get("steps")
    rows: list[tuple[str, str]] = []
    for s in steps if isinstance(steps, list) else []:
        if isinstance(s, dict):
            rows.append((str(s.get("step", "?")), _ms(s.get("ms"))))
    remote = tl.get("importer_steps")
    remote_rows = [(str(k), _ms(v)) for k, v in remote.items()] if isinstance(remote, dict) else []
    t_mig = tl.get("t_mig_ms")
    names = [r[0] for r in rows + remote_rows] + ["t_Mig", "step"]
    width = max(len(n) for n in names) + 2
    vals = [r[1] for r in rows + remote_rows] + [_ms(t_mig), "ms"]
    vwidth = max(len(v) for v in vals)
    out = [f"{'step'.ljust(width)}{'ms'.rjust(vwidth)}"]
    out += [f"{n.ljust(width)}{v.rjust(vwidth)}" for n, v in rows]
    if remote_rows:
        out.append(f"on {tl.get('to', 'the importing device')}:")
        out += [f"  {n.ljust(width - 2)}{v.rjust(vwidth)}" for n, v in remote_rows]
    if t_mig is not None:
        out.append(f"{'t_Mig'.ljust(width)}{_ms(t_mig).rjust(vwidth)}")
    note = tl.get("note")
    if isinstance(note, str) and note:
        out.append(f"note: {_cell(note)}")
    return "\n".join(out)


def format_session(s: dict[str, Any]) -> str:
    """One session, `ip addr show` style: a header line, then addresses and flows."""
    head = [f"session {s.get('session', '?')}"]
    for key in ("type", "state", "app"):
        if key in s:
            head.append(f"{key} {_cell(s[key])}")
    lines = ["  ".join(head)]
    for a in s.get("addresses") or []:
        lines.append(f"    address {a}")
    for f in s.get("flows") or []:
        if isinstance(f, dict):
            lines.append(
                f"    flow {f.get('flow', '?')} {f.get('kind', '?')} "
                f"{_cell(f.get('local'))} -> {_cell(f.get('remote'))}"
            )
        else:
            lines.append(f"    flow {_cell(f)}")
    for key, v in s.items():
        if key not in ("session", "type", "state", "app", "addresses", "flows"):
            lines.append(f"    {key} {_cell(v)}")
    return "\n".join(lines)


def _session_rows(sessions: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for s in sessions:
        if not isinstance(s, dict):
            continue
        flows = s.get("flows")
        rows.append({**s, "flows": len(flows) if isinstance(flows, list) else flows})
    return rows


def _print_json(obj: Any, out: TextIO) -> None:
    print(json.dumps(obj, separators=(",", ":")), file=out)


# ---------------------------------------------------------------------------------------------
# commands


def _run(ns: argparse.Namespace, client: ControlClient) -> int:
    as_json: bool = ns.json
    if ns.object == "session" and ns.command in (None, "list"):
        sessions = client.request("session.list").get("sessions", [])
        if as_json:
            _print_json(sessions, sys.stdout)
        elif not sessions:
            print("no sessions")
        else:
            cols = ["session", "type", "state", "addresses", "flows", "app"]
            print(format_table(_session_rows(sessions), cols))
        return EXIT_OK
    if ns.object == "session" and ns.command == "show":
        s = client.request("session.show", session=ns.session)
        if as_json:
            _print_json(s, sys.stdout)
        else:
            print(format_session(s))
        return EXIT_OK
    if ns.object == "session" and ns.command == "move":
        try:
            tl = client.request("session.move", session=ns.session, device=ns.device)
        except ControlUnreachable:
            raise
        except ControlError as e:
            if e.kind != "move_failed":
                raise
            print(f"sessmob: {e.message}", file=sys.stderr)
            if as_json:
                _print_json(
                    {
                        "error": e.message,
                        "step": e.step,
                        "reason": e.reason,
                        "timeline": e.timeline,
                    },
                    sys.stdout,
                )
            elif e.timeline.get("steps"):
                print("steps before the failure:", file=sys.stderr)
                print(format_timeline(e.timeline), file=sys.stderr)
            print(f"session {ns.session} keeps running on this device", file=sys.stderr)
            return EXIT_FAILED
        if as_json:
            _print_json(tl, sys.stdout)
        else:
            print(f"session {tl.get('session', ns.session)} moved to {tl.get('to', ns.device)}")
            print(format_timeline(tl))
        return EXIT_OK
    if ns.object == "device":
        devices = client.request("device.list").get("devices", [])
        if as_json:
            _print_json(devices, sys.stdout)
        elif not devices:
            print("no devices configured")
        else:
            print(format_table([d for d in devices if isinstance(d, dict)]))
        return EXIT_OK
    raise AssertionError(f"unhandled command {ns.object} {ns.command}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sessmob` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    delegated = _split_delegated(args)
    if delegated is not None:
        return _delegate(*delegated)
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # --help (0) or a usage error (2): argparse has printed why
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if ns.object is None:
        parser.print_usage(sys.stderr)
        print("sessmob: error: name an OBJECT: session, device, rm, app or bench", file=sys.stderr)
        return EXIT_USAGE
    path = os.path.join(state_dir(ns.state_dir), CONTROL_SOCKET)
    try:
        return _run(ns, ControlClient(path))
    except ControlUnreachable as e:
        print(f"sessmob: {e.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as e:
        print(f"sessmob: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
