"""Neighbour pre-resolution: make sure the link-layer address of a peer is known in advance.

The first packet the importing device sends to the CN after taking over a session must not wait
for ARP / Neighbor Discovery (a resolution round trip at best, a lost segment and an RTO at
worst). So during presignaling the importing device calls `resolve()` for the CN: it reads the
neighbour table and, when the entry is missing, provokes resolution by sending one UDP datagram
to the discard port, then polls until the kernel has a usable entry.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

from sessmob.net.rtnl import RTM_GETNEIGH, RTM_NEWNEIGH, Rtnl, RtnlError, nlattr, parse_attrs
from sessmob.netns import socket_in

RTM_DELNEIGH = 29

# <linux/neighbour.h>
NDA_DST = 1
NDA_LLADDR = 2
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PERMANENT
NUD_NAMES = {
    NUD_INCOMPLETE: "INCOMPLETE",
    NUD_REACHABLE: "REACHABLE",
    NUD_STALE: "STALE",
    NUD_DELAY: "DELAY",
    NUD_PROBE: "PROBE",
    NUD_FAILED: "FAILED",
    NUD_NOARP: "NOARP",
    NUD_PERMANENT: "PERMANENT",
}
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
DISCARD_PORT = 9


class NeighError(RtnlError):
    """A neighbour lookup failed or the neighbour could not be resolved in time."""


def state_name(state: int) -> str:
    """NUD state bits as text, e.g. 'REACHABLE' or 'NONE'."""
    return "|".join(name for bit, name in NUD_NAMES.items() if state & bit) or "NONE"


@dataclass(frozen=True)
class Neighbour:
    """One neighbour table entry."""

    addr: str
    ifindex: int
    state: int
    lladdr: str | None

    @property
    def usable(self) -> bool:
        """Whether packets to `addr` go out at once, without waiting for resolution."""
        return bool(self.state & NUD_USABLE) and self.lladdr is not None


def _ndmsg(ifindex: int, addr: str) -> bytes:
    """The ndmsg naming `addr`'s entry on `ifindex`, for RTM_GETNEIGH / RTM_DELNEIGH."""
    ip = ipaddress.ip_address(addr)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return NDMSG.pack(family, ifindex, 0, 0, 0) + nlattr(NDA_DST, ip.packed)


def lookup(rtnl: Rtnl, ifindex: int, addr: str) -> Neighbour | None:
    """The neighbour entry for `addr` on `ifindex` (RTM_GETNEIGH), or None if there is none."""
    ip = ipaddress.ip_address(addr)
    payload = _ndmsg(ifindex, addr)
    what = f"RTM_GETNEIGH {addr} on ifindex {ifindex} {rtnl.where}"
    try:
        replies = rtnl.request(RTM_GETNEIGH, 0, payload, what, NeighError)
    except NeighError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    for kind, body in replies:
        if kind == RTM_NEWNEIGH:
            _fam, index, state, _flags, _type = NDMSG.unpack_from(body)
            mac = parse_attrs(body, NDMSG.size).get(NDA_LLADDR)
            return Neighbour(str(ip), index, state, mac.hex(":") if mac else None)
    return None


def _prober(
    netns: str | None, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, ifindex: int
) -> tuple[socket.socket, tuple[str, int] | tuple[str, int, int, int]]:
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = (
        socket_in(netns, family, socket.SOCK_DGRAM)
        if netns
        else socket.socket(family, socket.SOCK_DGRAM)
    )
    dest: tuple[str, int] | tuple[str, int, int, int]
    if ip.version == 6:
        dest = (str(ip), DISCARD_PORT, 0, ifindex if ip.is_link_local else 0)
    else:
        dest = (str(ip), DISCARD_PORT)
    return sock, dest


def resolve(netns: str | None, ifname: str, addr: str, timeout: float = 1.0) -> str:
    """Ensure a usable (REACHABLE/STALE/DELAY/PERMANENT) neighbour entry; return its MAC.

    Set-up time only (opens sockets, sleeps). If there is no usable entry, one UDP datagram to
    the discard port of `addr` makes the kernel resolve it; the table is then polled until the
    entry is usable or `timeout` seconds have passed (NeighError, errno ETIMEDOUT). A FAILED
    entry is provoked again.
    """
    ip = ipaddress.ip_address(addr)
    where = f"{ifname} in {netns}" if netns else f"{ifname} in the current netns"
    deadline = time.monotonic() + timeout
    prober: socket.socket | None = None
    delay = 0.0002
    with Rtnl.open(netns) as rtnl:
        ifindex = rtnl.ifindex(ifname)
        try:
            while True:
                entry = lookup(rtnl, ifindex, str(ip))
                if entry is not None and entry.usable and entry.lladdr:
                    return entry.lladdr
                if prober is None or (entry is not None and entry.state & NUD_FAILED):
                    if prober is None:
                        prober, dest = _prober(netns, ip, ifindex)
                    try:
                        prober.sendto(b"\0", dest)
                    except OSError as e:
                        raise NeighError(
                            e.errno,
                            f"resolve {ip} on {where}: cannot send a probe datagram: {e.strerror}"
                            " (no route to it on this link?)",
                        ) from e
                if time.monotonic() >= deadline:
                    last = state_name(entry.state) if entry else "no entry"
                    raise NeighError(
                        errno.ETIMEDOUT,
                        f"resolve {ip} on {where}: no usable neighbour entry after {timeout} s "
                        f"(last state: {last}); is the host up and on this link?",
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        finally:
            if prober is not None:
                prober.close()


def forget(rtnl: Rtnl, ifindex: int, addr: str) -> None:
    """Delete the neighbour entry for `addr` on `ifindex`, if there is one (RTM_DELNEIGH)."""
    what = f"RTM_DELNEIGH {addr} {rtnl.where}"
    try:
        rtnl.request(RTM_DELNEIGH, 0, _ndmsg(ifindex, addr), what, NeighError)
    except NeighError as e:
        if e.errno != errno.ENOENT:
            raise


def held_by_other(netns: str | None, ifname: str, addr: str, timeout: float = 1.0) -> str | None:
    """The MAC of another node on the link that answers for `addr` now, or None if none does
    within `timeout` seconds. Not for an address of this device. Set-up time only.

    What the neighbour table knew is forgotten first (an old entry proves nothing), then the
    kernel resolves `addr` afresh (NS / ARP request); only an answer makes it usable. The
    question is asked anew every quarter second: a node that has only just taken the address
    may miss the first one (a bridge that snoops multicast may not know its new group yet).
    """
    ip = ipaddress.ip_address(addr)
    deadline = time.monotonic() + timeout
    with Rtnl.open(netns) as rtnl:
        ifindex = rtnl.ifindex(ifname)
        while True:
            forget(rtnl, ifindex, str(ip))
            left = deadline - time.monotonic()
            try:
                return resolve(netns, ifname, str(ip), max(0.0, min(left, 0.25)))
            except NeighError as e:
                if e.errno != errno.ETIMEDOUT:
                    raise
            if time.monotonic() >= deadline:
                return None
