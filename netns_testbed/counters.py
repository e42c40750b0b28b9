"""TCP counters of a network namespace: did the CN reset, time out or probe during a move?

The kernel keeps per-namespace SNMP counters in /proc/<tid>/net/snmp ("Tcp:") and
/proc/<tid>/net/netstat ("TcpExt:"). They are read through /proc/thread-self, so a thread that
entered a namespace with sessmob.netns.entered() reads that namespace's counters. Reading both
files costs ~0.25 ms: fine before and after a migration, never inside the freeze window.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_PREFIXES = ("Tcp", "TcpExt")


def _proc_net_dir() -> str:
    return "/proc/thread-self/net" if os.path.isdir("/proc/thread-self/net") else "/proc/self/net"


def _parse(text: str, path: str, out: dict[str, int]) -> None:
    """Parse the header/value line pairs of snmp/netstat into `out` as "Prefix.Name"."""
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        hp, _, hnames = head.partition(":")
        vp, _, hvals = vals.partition(":")
        if hp != vp:
            raise ValueError(f"{path}: header {hp!r} followed by values for {vp!r}")
        if hp not in _PREFIXES:
            continue
        names, numbers = hnames.split(), hvals.split()
        if len(names) != len(numbers):
            raise ValueError(f"{path}: {hp} has {len(names)} names but {len(numbers)} values")
        for name, num in zip(names, numbers, strict=True):
            out[f"{hp}.{name}"] = int(num)


def read_tcp_counters(proc_net: str | None = None) -> dict[str, int]:
    """Tcp.* and TcpExt.* counters of the calling thread's network namespace.

    Keys look like "Tcp.OutRsts", "Tcp.EstabResets", "TcpExt.TCPLossProbes". `proc_net`
    overrides the directory (e.g. "/proc/<pid>/net" of a process in another namespace).
    """
    base = proc_net or _proc_net_dir()
    out: dict[str, int] = {}
    for name in ("snmp", "netstat"):
        path = os.path.join(base, name)
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise OSError(e.errno, f"cannot read TCP counters from {path}: {e.strerror}") from e
        _parse(text, path, out)
    if "Tcp.OutRsts" not in out:
        raise ValueError(f"no Tcp: counters found under {base}")
    return out


def diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """after - before for every key in `after` (keys missing before count from 0)."""
    return {k: v - before.get(k, 0) for k, v in after.items()}


@dataclass(frozen=True)
class CnCounters:
    """What a migration cost the CN, as counter deltas.

    resets: OutRsts + EstabResets + AttemptFails (any of them means a broken connection);
    rto: TCPTimeouts; tlp: TCPLossProbes; retrans_segs: RetransSegs.
    """

    resets: int
    rto: int
    tlp: int
    retrans_segs: int

    @classmethod
    def from_delta(cls, delta: dict[str, int]) -> CnCounters:
        return cls(
            resets=delta.get("Tcp.OutRsts", 0)
            + delta.get("Tcp.EstabResets", 0)
            + delta.get("Tcp.AttemptFails", 0),
            rto=delta.get("TcpExt.TCPTimeouts", 0),
            tlp=delta.get("TcpExt.TCPLossProbes", 0),
            retrans_segs=delta.get("Tcp.RetransSegs", 0),
        )

    @classmethod
    def between(cls, before: dict[str, int], after: dict[str, int]) -> CnCounters:
        return cls.from_delta(diff(before, after))

    def as_dict(self) -> dict[str, int]:
        return {
            "resets": self.resets,
            "rto": self.rto,
            "tlp": self.tlp,
            "retrans_segs": self.retrans_segs,
        }
