"""Keep a device silent on session addresses it no longer owns.

Removing a session address isolates its flows on input (the kernel drops segments for an
address that is not local), but not on output: a frozen socket still transmits — TCP small
queues and timers call tcp_write_xmit — and over IPv6 those segments leave even though the
source address is gone. A segment that leaves after the dump carries data the importing device
believes unsent, the peer ACKs it, and the restored socket then discards every ACK "of unsent
data": the connection stalls for good.

The guard is one static nftables rule per family, installed when a device starts (never
inside the freeze window): drop locally generated packets whose source is a session address
that is not local (any more). The drop makes the transmit fail, so the frozen socket's snd_nxt
does not advance either and the dump stays exact. IPv4 already fails the route lookup for a
non-local source; the rule makes both families behave alike.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterable

from sessmob import netns

TABLE = "sessmob_guard"


class IsolationError(RuntimeError):
    """Installing or removing the output guard failed."""


def guard_ruleset(prefixes: Iterable[str]) -> str:
    """The nft script for the guard over session addresses ("addr" or "addr/len")."""
    v4: list[str] = []
    v6: list[str] = []
    for p in prefixes:
        # "addr/len" names one address and the prefix of its link, not a range: guarding the
        # whole prefix would also drop packets injected as if from a peer on that link
        # (a restored flow's FIN, queued UDP datagrams).
        try:
            ip = ipaddress.ip_interface(p).ip
        except ValueError as e:
            raise IsolationError(f"session address {p!r}: {e}") from None
        (v4 if ip.version == 4 else v6).append(str(ip))
    lines = [f"table inet {TABLE} {{"]
    for name, kind, elems in (("sess4", "ipv4_addr", v4), ("sess6", "ipv6_addr", v6)):
        lines.append(f"  set {name} {{ type {kind}; flags interval;")
        if elems:
            lines.append(f"    elements = {{ {', '.join(elems)} }}")
        lines.append("  }")
    lines += [
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        "    ip saddr @sess4 fib saddr type != local counter drop",
        "    ip6 saddr @sess6 fib saddr type != local counter drop",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _nft(ns: str | None, script: str, what: str) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
        )

    try:
        if ns is None:
            proc = run()
        else:
            with netns.entered(ns):
                proc = run()
    except FileNotFoundError:
        raise IsolationError("nft not found: install the nftables package") from None
    if proc.returncode != 0:
        where = f"netns {ns}" if ns else "this namespace"
        raise IsolationError(f"{what} in {where} failed: {proc.stderr.strip()}")


def install_output_guard(ns: str | None, prefixes: Iterable[str]) -> None:
    """Install (or replace) the guard in namespace `ns` (None: the caller's namespace)."""
    script = f"table inet {TABLE}\ndelete table inet {TABLE}\n" + guard_ruleset(prefixes)
    _nft(ns, script, "installing the output guard")


def remove_output_guard(ns: str | None) -> None:
    """Remove the guard (idempotent)."""
    _nft(ns, f"table inet {TABLE}\ndelete table inet {TABLE}\n", "removing the output guard")
