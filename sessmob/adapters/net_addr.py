"""Address-takeover network adapter: the session's own address moves with it.

For devices on one link. Each session gets its own address from the configured pool, so
moving the address moves exactly the session's flows. Removing the address on the exporting
device is the flow isolation (arriving segments are dropped; the output guard installed at
start drops what a frozen socket still tries to send); the importing device adds it without
DAD, waits until it really receives, and announces it (unsolicited NA / gratuitous ARP) so the
peer switches at once. Every netlink message and frame is prepared before the freeze.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sessmob.adapters.base import Refused, Role, TransferOffer
from sessmob.net import neigh
from sessmob.net.announce import Announcer
from sessmob.net.isolation import install_output_guard, remove_output_guard
from sessmob.net.rtnl import AddressMove, Rtnl
from sessmob.session import ServiceSession, SessionAddress

if TYPE_CHECKING:
    from sessmob.exchange import ExchangeDoc

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    """One address, ready to move: encoded netlink messages and the announcement frame."""

    address: SessionAddress
    move: AddressMove
    announcer: Announcer

    def close(self) -> None:
        self.move.close()
        self.announcer.close()


class NetAddrAdapter:
    """Adapter for the session's network identity (its own address on a shared link)."""

    name = "net_addr"

    def __init__(self, ifname: str, pool: list[str]) -> None:
        self.ifname = ifname
        self.pool = [_parse(p) for p in pool]
        self.rtnl = Rtnl.open(None)
        self.ifindex = self.rtnl.ifindex(ifname)
        self._prepared: dict[str, _Prepared] = {}  # addr -> ready to move
        self._reserved: dict[str, str] = {}  # addr -> session id holding it here
        install_output_guard(None, [str(a) for a in self.pool])

    def close(self) -> None:
        for p in self._prepared.values():
            p.close()
        self._prepared.clear()
        try:
            remove_output_guard(None)
        finally:
            self.rtnl.close()

    # -- addresses ---------------------------------------------------------------------

    def _prepare(self, address: SessionAddress) -> _Prepared:
        p = self._prepared.get(address.addr)
        if p is None:
            p = _Prepared(
                address,
                AddressMove(self.rtnl, self.ifindex, address.addr, address.prefixlen),
                Announcer(None, self.ifname, address.addr),
            )
            self._prepared[address.addr] = p
        return p

    def allocate(self, session: ServiceSession, in_use: set[str]) -> SessionAddress:
        """Give a new session a free address from the pool, configured and announced."""
        for a in self.pool:
            if a.addr in in_use or a.addr in self._reserved or self.rtnl.has_address(a.addr):
                continue
            p = self._prepare(a)
            p.move.add()
            p.announcer.send()
            session.addresses.append(a)
            return a
        raise Refused(self.name, f"address pool exhausted ({len(self.pool)} addresses)")

    def free(self, session: ServiceSession) -> None:
        """The session ended here: remove its addresses."""
        for a in session.addresses:
            p = self._prepared.pop(a.addr, None)
            if p is not None:
                try:
                    p.move.delete()
                except OSError as e:
                    log.warning("removing %s: %s", a, e)
                p.close()

    # -- interface A -------------------------------------------------------------------

    async def get_resources(self, session: ServiceSession) -> dict[str, Any]:
        # Moving an address moves every flow on it: refuse while others use it.
        others = await sharing_sockets(session)
        if others:
            raise Refused(
                self.name,
                "other sockets use the session address and would move with it: "
                + "; ".join(others[:8])
                + (f" (+{len(others) - 8} more)" if len(others) > 8 else "")
                + ". Close them or bind them elsewhere.",
            )
        peers = sorted({f.remote[0] for f in session.flows if f.remote})
        return {"addresses": [str(a) for a in session.addresses], "peers": peers}

    async def reserve_resources(self, offer: TransferOffer) -> None:
        need = offer.resources.get(self.name, {})
        for text in need.get("addresses", []):
            a = _parse(text)
            holder = self._reserved.get(a.addr)
            if holder is not None and holder != offer.session_id:
                raise Refused(self.name, f"address {a} is reserved for session {holder}")
            if self.rtnl.has_address(a.addr):
                raise Refused(self.name, f"address {a} is already configured on this device")
            self._prepare(a)
            self._reserved[a.addr] = offer.session_id
        # The importing side must know the peers' MACs before the freeze.
        for peer in need.get("peers", []):
            try:
                await asyncio.to_thread(neigh.resolve, None, self.ifname, peer, 1.0)
            except OSError as e:
                raise Refused(self.name, f"cannot reach peer {peer} from here: {e}") from e

    async def release_resources(self, offer: TransferOffer) -> None:
        for text in offer.resources.get(self.name, {}).get("addresses", []):
            addr = _parse(text).addr
            if self._reserved.get(addr) == offer.session_id:
                del self._reserved[addr]

    async def do_presignaling(self, session: ServiceSession, role: Role) -> None:
        for a in session.addresses:
            self._prepare(a)

    async def suspend(self, session: ServiceSession) -> None:
        for a in session.addresses:
            self._prepared[a.addr].move.delete()  # isolation: the address leaves

    async def get_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:
        doc.addresses.extend(str(a) for a in session.addresses)

    async def set_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:
        for text in doc.addresses:
            a = _parse(text)
            p = self._prepare(a)
            p.move.add(wait=False)  # the kernel finishes the local route while we restore
            session.addresses.append(a)

    async def resume(self, session: ServiceSession, role: Role) -> None:
        for a in session.addresses:
            p = self._prepared[a.addr]
            if role is Role.IMPORT:
                p.move.wait_usable()  # before anything is injected or announced
            elif not self.rtnl.has_address(a.addr):
                p.move.add()  # the failed move gives the address back (if it had left)

    async def do_postsignaling(self, session: ServiceSession, role: Role) -> None:
        for a in session.addresses:
            self._prepared[a.addr].announcer.send()
            self._reserved.pop(a.addr, None)

    async def held_elsewhere(self, session: ServiceSession, timeout: float = 1.0) -> str | None:
        """Which of the session's addresses another node on the link answers for now, with
        that node's MAC ("addr at mac"), or None. Asked by an exporting device that does not
        know whether the importer took the session over (its address is gone from here)."""
        for a in session.addresses:
            mac = await asyncio.to_thread(neigh.held_by_other, None, self.ifname, a.addr, timeout)
            if mac is not None:
                return f"{a.addr} at {mac}"
        return None

    async def shutdown(self, session: ServiceSession, role: Role) -> None:
        for a in session.addresses:
            p = self._prepared.pop(a.addr, None)
            if p is None:
                continue
            if role is Role.IMPORT:  # an aborted import: take the address away again
                try:
                    p.move.delete()
                except OSError as e:
                    log.info("discarding %s: %s", a, e)
                self._reserved.pop(a.addr, None)
            p.close()


def _endpoint(text: str) -> tuple[str, str]:
    """'[2001:db8::1]:7000' / '192.0.2.1:80' / '[::]:*' -> (addr, port) as ss prints them."""
    host, _, port = text.rpartition(":")
    return host.strip("[]").removeprefix("::ffff:"), port


async def sharing_sockets(session: ServiceSession) -> list[str]:
    """Sockets on this device whose local address is one of the session's and that are not
    its flows (sock_diag through `ss`, before the freeze): 'tcp ESTAB [a]:p -> [b]:q (pid)'."""
    mine = set()
    for f in session.flows:
        if f.local is None:
            continue
        local = (f.local[0].removeprefix("::ffff:"), str(f.local[1]))
        remote = (f.remote[0].removeprefix("::ffff:"), str(f.remote[1])) if f.remote else None
        mine.add((str(f.kind), local, remote))
    found: list[str] = []
    for a in session.addresses:
        target = f"[{a.addr}]" if ":" in a.addr else a.addr
        proc = await asyncio.create_subprocess_exec(
            "ss", "-Htanup", "src", target,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise Refused("net_addr", f"cannot list sockets (ss): {err.decode().strip()}")
        for line in out.decode().splitlines():
            parts = line.split()
            if len(parts) < 6 or parts[1] in ("TIME-WAIT", "CLOSE"):
                continue
            kind, state, local, peer = parts[0], parts[1], _endpoint(parts[4]), _endpoint(parts[5])
            remote = None if peer[1] == "*" else peer
            if (kind, local, remote) in mine or (kind == "udp" and (kind, local, None) in mine):
                continue
            users = " ".join(parts[6:])
            found.append(f"{kind} {state} {parts[4]} -> {parts[5]} {users}".strip())
    return found


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> SessionAddress:
    """Cached: SetState (inside the freeze window) finds the addresses its reservation parsed."""
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as e:
        raise ValueError(f"session address {text!r}: {e}") from None
    if "/" not in text:
        raise ValueError(f"session address {text!r} needs a prefix length (addr/len)")
    return SessionAddress(str(iface.ip), iface.network.prefixlen)
