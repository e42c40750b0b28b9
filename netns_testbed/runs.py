"""Registry of testbed runs: who owns which namespaces, and how to clean up after them.

Every run gets a per-run prefix (``sm`` + 6 hex digits + ``-``) that is put in front of each of
its namespace names, so parallel runs and leftovers never collide. Before a run creates anything
it writes ``/run/sessmob-testbed/<prefix>.json`` naming its topology, its namespaces and its
owner process. A run whose owner is gone (killed, crashed, the shell that ran ``up`` closed) is
*stale*; a namespace with the ``sm??????-`` shape that has no record is an *orphan*. Both can be
removed with :func:`remove_run` (``python -m netns_testbed down``).

This module only deals in names, records and processes; building topologies is topology.py's job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from pyroute2 import netns as _pr_netns

RUN_DIR = "/run/sessmob-testbed"
NETNS_DIR = "/run/netns"

#: Shape of generated prefixes; namespaces that match it but have no record are orphans.
AUTO_PREFIX_RE = re.compile(r"^sm[0-9a-f]{6}-$")
#: What a user-chosen prefix may look like: short, lowercase, exactly one trailing dash.
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,15}-$")
_AUTO_NETNS_RE = re.compile(r"^(sm[0-9a-f]{6}-)[a-z0-9]+$")

RECORD_VERSION = 1


class RunError(RuntimeError):
    """A registry operation failed; the message names the run and what to do."""

    __test__ = False  # keep pytest from collecting anything named like a test


def new_prefix() -> str:
    """A fresh random run prefix such as ``sm3fa9c1-`` that no record or namespace uses yet."""
    for _ in range(64):
        prefix = f"sm{secrets.token_hex(3)}-"
        if not os.path.exists(record_path(prefix)) and not namespaces_with_prefix(prefix):
            return prefix
    raise RunError("could not find an unused run prefix after 64 attempts")


def normalize_prefix(prefix: str) -> str:
    """Accept ``sm3fa9c1`` or ``sm3fa9c1-`` and return the canonical form with the dash.

    Raises ValueError for anything that could not be a run prefix, so that a typo in
    ``down`` cannot match (and delete) namespaces that are not ours.
    """
    p = prefix if prefix.endswith("-") else prefix + "-"
    if not PREFIX_RE.match(p):
        raise ValueError(
            f"invalid run prefix {prefix!r}: expected 2-16 lowercase letters/digits starting "
            "with a letter, optionally followed by '-' (e.g. 'sm3fa9c1-')"
        )
    return p


def netns_belongs_to(name: str, prefix: str) -> bool:
    """True if namespace ``name`` is ``prefix`` + a host name (host names contain no dash)."""
    if not name.startswith(prefix):
        return False
    rest = name[len(prefix) :]
    return bool(rest) and "-" not in rest


def record_path(prefix: str) -> str:
    return os.path.join(RUN_DIR, f"{prefix}.json")


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``), sorted."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def namespaces_with_prefix(prefix: str) -> list[str]:
    return [n for n in list_netns() if netns_belongs_to(n, prefix)]


# -- owner liveness -----------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (to detect pid reuse); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse_stat_start_time(data)


def parse_stat_start_time(data: bytes) -> int | None:
    """Start time from the contents of /proc/<pid>/stat; None for a zombie."""
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # a zombie or dead task owns nothing any more
        return None
    return int(fields[19])  # field 22 overall


def owner_alive(pid: int, start_time: int | None) -> bool:
    """True if ``pid`` runs and is the same process that was recorded (not a reused pid)."""
    if pid <= 0:
        return False
    now = process_start_time(pid)
    if now is None:
        return False
    return start_time is None or now == start_time


# -- records ------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What one run created and who owns it. ``topology`` is "?" for an orphan."""

    prefix: str
    topology: str
    namespaces: list[str]
    owner_pid: int
    owner_start: int | None = None
    created: float = field(default_factory=time.time)
    version: int = RECORD_VERSION
    orphan: bool = False

    @property
    def alive(self) -> bool:
        return not self.orphan and owner_alive(self.owner_pid, self.owner_start)

    @property
    def state(self) -> str:
        if self.orphan:
            return "orphan"
        return "alive" if self.alive else "stale"

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("orphan")
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> RunRecord:
        try:
            ns = d["namespaces"]
            if not isinstance(ns, list) or not all(isinstance(n, str) for n in ns):
                raise TypeError("namespaces must be a list of strings")
            start = d.get("owner_start")
            return cls(
                prefix=normalize_prefix(str(d["prefix"])),
                topology=str(d["topology"]),
                namespaces=list(ns),
                owner_pid=int(d["owner_pid"]),  # type: ignore[call-overload]
                owner_start=None if start is None else int(start),  # type: ignore[call-overload]
                created=float(d.get("created", 0.0)),  # type: ignore[arg-type]
                version=int(d.get("version", RECORD_VERSION)),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"malformed run record: {e}") from e


def write_record(rec: RunRecord) -> str:
    """Write (atomically) the record of a run; returns its path."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    path = record_path(rec.prefix)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def create_record(
    prefix: str, topology: str, namespaces: Iterable[str], owner_pid: int
) -> RunRecord:
    """Claim ``prefix`` for a new run; fails if a record or namespace with it already exists."""
    prefix = normalize_prefix(prefix)
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    path = record_path(prefix)
    rec = RunRecord(
        prefix=prefix,
        topology=topology,
        namespaces=list(namespaces),
        owner_pid=owner_pid,
        owner_start=process_start_time(owner_pid),
    )
    existing = namespaces_with_prefix(prefix)
    if existing:
        raise RunError(
            f"run prefix {prefix!r} is in use by namespaces {existing}; "
            f"remove them with 'python -m netns_testbed down {prefix}' or pick another prefix"
        )
    try:  # O_EXCL: two processes choosing the same prefix cannot both win
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise RunError(
            f"run prefix {prefix!r} already has a record ({path}); "
            f"remove it with 'python -m netns_testbed down {prefix}' or pick another prefix"
        ) from None
    os.close(fd)
    write_record(rec)
    return rec


def read_record(prefix: str) -> RunRecord | None:
    """The record of ``prefix``, or None if there is none."""
    path = record_path(normalize_prefix(prefix))
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise RunError(f"run record {path} is not valid JSON ({e}); delete it by hand") from e
    return RunRecord.from_json(data)


def set_owner(prefix: str, owner_pid: int) -> RunRecord:
    """Hand a run to another owner (``up`` without ``--hold`` gives it to the calling shell)."""
    rec = read_record(prefix)
    if rec is None:
        raise RunError(f"no record for run {prefix!r}")
    rec.owner_pid = owner_pid
    rec.owner_start = process_start_time(owner_pid)
    write_record(rec)
    return rec


def list_runs() -> list[RunRecord]:
    """All recorded runs plus orphans (``sm??????-`` namespaces without a record), by prefix."""
    runs: dict[str, RunRecord] = {}
    try:
        names = sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            rec = read_record(name[: -len(".json")])
        except (RunError, ValueError):
            continue  # not ours or unreadable: never guess
        if rec is not None:
            runs[rec.prefix] = rec
    recorded = list(runs)
    for ns in list_netns():
        m = _AUTO_NETNS_RE.match(ns)
        if not m or any(netns_belongs_to(ns, p) for p in recorded):
            continue
        prefix = m.group(1)
        orphan = runs.setdefault(
            prefix, RunRecord(prefix, "?", [], owner_pid=0, created=0.0, orphan=True)
        )
        orphan.namespaces.append(ns)
    return [runs[p] for p in sorted(runs)]


def stale_runs() -> list[RunRecord]:
    """Runs whose owner process is gone, and orphans."""
    return [r for r in list_runs() if not r.alive]


# -- removal ------------------------------------------------------------------------------------


def netns_pids(names: Iterable[str]) -> dict[str, list[int]]:
    """Processes whose (main thread's) network namespace is one of ``names``.

    The equivalent of ``ip netns pids``: compares /proc/<pid>/ns/net with the bind mounts.
    """
    by_inode: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(os.path.join(NETNS_DIR, name))
        except FileNotFoundError:
            continue
        by_inode[(st.st_dev, st.st_ino)] = name
    out: dict[str, list[int]] = {}
    if not by_inode:
        return out
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        owner = by_inode.get((st.st_dev, st.st_ino))
        if owner is not None:
            out.setdefault(owner, []).append(int(entry))
    return out


def kill_pids(pids: Iterable[int], grace: float = 1.0) -> list[int]:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left; returns the pids hit."""
    me = os.getpid()
    targets = [p for p in pids if p != me]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(targets)
    while left and time.monotonic() < deadline:
        _reap(left)
        left = [p for p in left if process_start_time(p) is not None]
        if left:
            time.sleep(0.01)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _reap(left)
    return targets


def _reap(pids: Iterable[int]) -> None:
    """Collect our own children among ``pids`` so they do not linger as zombies."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def delete_netns(name: str) -> None:
    """Unmount and unlink /run/netns/<name>. The kernel frees the namespace (and the veths in
    it) once nothing refers to it any more."""
    try:
        _pr_netns.remove(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise RunError(f"cannot remove network namespace {name!r}: {e}") from e


def remove_namespaces(names: Iterable[str], grace: float = 1.0) -> list[str]:
    """Kill every process in the namespaces, then delete them; returns the ones that existed."""
    names = [n for n in names if os.path.lexists(os.path.join(NETNS_DIR, n))]
    pids = [p for ps in netns_pids(names).values() for p in ps]
    if pids:
        kill_pids(pids, grace)
    for name in names:
        delete_netns(name)
    return names


def remove_run(prefix: str, grace: float = 1.0) -> list[str]:
    """Remove a run (recorded, stale or orphan): kill its processes, delete its namespaces and
    then its record. Returns the namespaces that were deleted. Safe to call repeatedly."""
    prefix = normalize_prefix(prefix)
    try:
        rec = read_record(prefix)
    except RunError:
        rec = None  # an unreadable record must not keep its namespaces alive
    planned = set(rec.namespaces if rec else []) | set(namespaces_with_prefix(prefix))
    removed = remove_namespaces(sorted(planned), grace)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(prefix))
    return removed
