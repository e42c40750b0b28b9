"""TCP transport adapter: the session's TCP flows, frozen and rebuilt with TCP repair.

Every kernel call goes through the batch API (one crossing into C per step for all of a
session's connections). The RM holds its own descriptor of each socket (received from the
application with SCM_RIGHTS); freeze and dump work through it, and on the exporting device the
RM releases it in repair mode before the application closes its own — the last close then
happens in repair mode and sends nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
from typing import Any

from sessmob import tcp_repair
from sessmob.adapters.base import Refused, Role, TransferOffer, fresh_sockets
from sessmob.exchange import ExchangeDoc, FlowState
from sessmob.session import Flow, FlowKind, ServiceSession

SIOCOUTQ = termios.TIOCOUTQ


def _queued(sock: socket.socket) -> int:
    """Bytes waiting in both queues (to size the importing side's buffers)."""
    buf = bytearray(4)
    total = 0
    for req in (termios.FIONREAD, SIOCOUTQ):
        try:
            fcntl.ioctl(sock.fileno(), req, buf)
            total += struct.unpack("i", buf)[0]
        except OSError:
            pass
    return total


class TcpAdapter:
    """Adapter for the session's TCP flows."""

    name = "tcp"

    def __init__(self) -> None:
        # Opened once in this namespace: activation sends its window ACKs through them.
        self.acks = tcp_repair.AckSender()

    def close(self) -> None:
        self.acks.close()

    @staticmethod
    def _flows(session: ServiceSession) -> list[Flow]:
        return [f for f in session.flows if f.kind is FlowKind.TCP and f.sock is not None]

    async def get_resources(self, session: ServiceSession) -> dict[str, Any]:
        flows = self._flows(session)
        return {
            "flows": [
                {"flow": f.flow_id, "local": list(f.local or ()), "remote": list(f.remote or ())}
                for f in flows
            ],
            "queued_bytes": sum(_queued(f.sock) for f in flows if f.sock is not None),
        }

    async def reserve_resources(self, offer: TransferOffer) -> None:
        need = offer.resources.get(self.name, {})
        if len(need.get("flows", [])) > 4096:
            raise Refused(self.name, f"{len(need['flows'])} TCP flows exceed the limit of 4096")

    async def release_resources(self, offer: TransferOffer) -> None:
        return None

    async def do_presignaling(self, session: ServiceSession, role: Role) -> None:
        return None

    async def suspend(self, session: ServiceSession) -> None:
        flows = self._flows(session)
        if flows:
            tcp_repair.freeze_many([f.sock for f in flows])  # type: ignore[misc]

    async def get_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:

        flows = self._flows(session)
        if not flows:
            return
        snaps = tcp_repair.dump_many([f.sock for f in flows])  # type: ignore[misc]
        for f, snap in zip(flows, snaps, strict=True):
            doc.flows.append(FlowState(flow_id=f.flow_id, kind="tcp", tcp=snap))

    def prepare_sockets(self, offer: TransferOffer) -> dict[str, socket.socket]:
        """Fresh sockets for the offer's TCP flows (flow id -> socket), made before the
        freeze so that the importer can hold them before the state arrives; SetState then
        restores into them (session.meta["prepared"])."""
        return fresh_sockets(offer, self.name, socket.SOCK_STREAM)

    async def set_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:
        states = [fs for fs in doc.flows if fs.kind == "tcp" and fs.tcp is not None]
        if not states:
            return
        snaps = [fs.tcp for fs in states]
        prepared: dict[str, socket.socket] = session.meta.get("prepared", {})
        made = [prepared[fs.flow_id] for fs in states] if prepared else []
        try:
            if made:
                tcp_repair.restore_into_many(made, snaps)  # type: ignore[arg-type]
                socks = made
            else:
                socks = tcp_repair.restore_many(snaps)  # type: ignore[arg-type]
        except tcp_repair.BatchError as e:
            # Keep nothing half-built: the restored ones go silently (prepared ones that
            # failed may be half-built too, so all of them go).
            done: list[socket.socket | int] = [r for r in e.results if isinstance(r, socket.socket)]
            with contextlib.suppress(tcp_repair.BatchError):
                tcp_repair.release_many(list(made) if made else done)
            raise
        for fs, sock in zip(states, socks, strict=True):
            snap = fs.tcp
            assert snap is not None
            session.flows.append(Flow(fs.flow_id, FlowKind.TCP, sock, snap.local, snap.remote))

    async def resume(self, session: ServiceSession, role: Role) -> None:
        flows = self._flows(session)
        if not flows:
            return
        if role is Role.IMPORT:
            tcp_repair.activate_many([f.sock for f in flows], self.acks)  # type: ignore[misc]
        else:
            for f in flows:
                tcp_repair.resume(f.sock)  # type: ignore[arg-type]

    async def do_postsignaling(self, session: ServiceSession, role: Role) -> None:
        return None

    async def shutdown(self, session: ServiceSession, role: Role) -> None:
        flows = self._flows(session)
        if flows:
            # Silent: repair mode on, then close (no FIN, no RST to the peer).
            tcp_repair.release_many([f.sock for f in flows])  # type: ignore[misc]
            for f in flows:
                f.sock = None
