"""UDP transport adapter: bound and connected UDP sockets with their options.

UDP has no repair mode and no sequence state: moving a flow is rebuilding a socket with the
same addresses and options. What must not be lost are datagrams that arrived but were not yet
read: GetState drains them (the application is suspended and the address already gone, so
nothing more arrives), and the importing side puts them back into the new socket's receive
queue by injecting them into its own stack as if from their senders — the application then
reads them as usual. After a failed move they go back into the original socket the same way.
"""

from __future__ import annotations

import socket
from typing import Any

from sessmob.adapters.base import Refused, Role, TransferOffer, fresh_sockets
from sessmob.exchange import ExchangeDoc, FlowState, UdpState
from sessmob.net.inet import is_v4, udp_packet
from sessmob.session import Flow, FlowKind, ServiceSession

MAX_DRAIN = 4096  # datagrams per flow
MAX_DRAIN_BYTES = 16 << 20

_SOL_IP, _SOL_IPV6 = socket.IPPROTO_IP, socket.IPPROTO_IPV6
IP_FREEBIND = 15  # linux/in.h; not exported by Python's socket module
_OPTIONS_COMMON = {"sndbuf": (socket.SOL_SOCKET, socket.SO_SNDBUF),
                   "rcvbuf": (socket.SOL_SOCKET, socket.SO_RCVBUF),
                   "mark": (socket.SOL_SOCKET, socket.SO_MARK)}  # fmt: skip
_OPTIONS_V4 = {"tos": (_SOL_IP, socket.IP_TOS), "ttl": (_SOL_IP, socket.IP_TTL)}
_OPTIONS_V6 = {"tos": (_SOL_IPV6, socket.IPV6_TCLASS), "ttl": (_SOL_IPV6, socket.IPV6_UNICAST_HOPS)}
_DEFAULTS = {"mark": 0, "tos": 0}


def _options(family: int, local: str) -> dict[str, tuple[int, int]]:
    v4 = family == socket.AF_INET or local.startswith("::ffff:")
    return {**_OPTIONS_COMMON, **(_OPTIONS_V4 if v4 else _OPTIONS_V6)}


class UdpAdapter:
    """Adapter for the session's UDP flows."""

    name = "udp"

    def __init__(self) -> None:
        # Send-only raw sockets, opened once, for putting datagrams back.
        self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def close(self) -> None:
        self.raw4.close()
        self.raw6.close()

    @staticmethod
    def _flows(session: ServiceSession) -> list[Flow]:
        return [f for f in session.flows if f.kind is FlowKind.UDP and f.sock is not None]

    def _inject(self, local: tuple[str, int], queued: list[tuple[str, int, bytes]]) -> None:
        raw = self.raw4 if is_v4(local[0]) else self.raw6
        dst = local[0].removeprefix("::ffff:") if is_v4(local[0]) else local[0]
        for addr, port, payload in queued:
            raw.sendto(udp_packet((addr, port), local, payload), (dst, 0))

    async def get_resources(self, session: ServiceSession) -> dict[str, Any]:
        return {"flows": [{"flow": f.flow_id, "local": list(f.local or ())}
                          for f in self._flows(session)]}  # fmt: skip

    async def reserve_resources(self, offer: TransferOffer) -> None:
        need = offer.resources.get(self.name, {})
        if len(need.get("flows", [])) > 1024:
            raise Refused(self.name, "more than 1024 UDP flows")

    def prepare_sockets(self, offer: TransferOffer) -> dict[str, socket.socket]:
        """Fresh sockets for the offer's UDP flows, made before the freeze (see
        TcpAdapter.prepare_sockets); SetState configures and binds them."""
        return fresh_sockets(offer, self.name, socket.SOCK_DGRAM)

    async def release_resources(self, offer: TransferOffer) -> None:
        return None

    async def do_presignaling(self, session: ServiceSession, role: Role) -> None:
        return None

    async def suspend(self, session: ServiceSession) -> None:
        return None  # the application is quiet and the address gone: nothing arrives

    async def get_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:

        drained: dict[str, list[tuple[str, int, bytes]]] = {}
        for f in self._flows(session):
            sock = f.sock
            assert sock is not None
            local = sock.getsockname()[:2]
            try:
                remote: tuple[str, int] | None = sock.getpeername()[:2]
            except OSError:
                remote = None
            options = {
                name: sock.getsockopt(level, opt)
                for name, (level, opt) in _options(sock.family, local[0]).items()
            }
            queued: list[tuple[str, int, bytes]] = []
            total = 0
            while len(queued) < MAX_DRAIN:
                try:
                    # Peek first: a datagram that would overflow the limit stays queued
                    # (and is lost with the old socket) rather than failing the move.
                    data, src = sock.recvfrom(65535, socket.MSG_DONTWAIT | socket.MSG_PEEK)
                except BlockingIOError:
                    break
                if total + len(data) > MAX_DRAIN_BYTES:
                    break
                sock.recvfrom(65535, socket.MSG_DONTWAIT)
                queued.append((src[0], src[1], data))
                total += len(data)
            drained[f.flow_id] = queued
            doc.flows.append(
                FlowState(
                    flow_id=f.flow_id,
                    kind="udp",
                    udp=UdpState(sock.family, local, remote, options, queued),
                )
            )
        session.meta["udp_drained"] = drained

    async def set_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:
        for fs in doc.flows:
            if fs.kind != "udp" or fs.udp is None:
                continue
            st: UdpState = fs.udp
            prepared = session.meta.get("prepared", {}).get(fs.flow_id)
            sock = prepared if prepared is not None else socket.socket(st.family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(_SOL_IP, IP_FREEBIND, 1)  # the address may come later
                for name, (level, opt) in _options(st.family, st.local[0]).items():
                    value = st.options.get(name)
                    if value is None or _DEFAULTS.get(name) == value:
                        continue
                    if name in ("sndbuf", "rcvbuf"):
                        value //= 2  # getsockopt reports the kernel's doubled size
                    sock.setsockopt(level, opt, value)
                sock.bind(st.local)
                if st.remote is not None:
                    sock.connect(st.remote)
            except OSError:
                sock.close()
                raise
            session.flows.append(Flow(fs.flow_id, FlowKind.UDP, sock, st.local, st.remote))
            session.meta.setdefault("udp_queued", {})[fs.flow_id] = (st.local, st.queued)

    async def resume(self, session: ServiceSession, role: Role) -> None:
        if role is Role.IMPORT:
            for local, queued in session.meta.pop("udp_queued", {}).values():
                self._inject(tuple(local), queued)
            return
        for f in self._flows(session):  # failed move: the drained datagrams go back
            queued = session.meta.get("udp_drained", {}).get(f.flow_id, [])
            if queued and f.local is not None:
                self._inject(f.local, queued)
        session.meta.pop("udp_drained", None)

    async def do_postsignaling(self, session: ServiceSession, role: Role) -> None:
        return None

    async def shutdown(self, session: ServiceSession, role: Role) -> None:
        for f in self._flows(session):
            assert f.sock is not None
            f.sock.close()
            f.sock = None
        session.meta.pop("udp_drained", None)
        session.meta.pop("udp_queued", None)
