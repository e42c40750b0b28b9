"""The Relocation Manager: one per device (`sessmob rm`).

Inside, as in the paper's Fig. 5: the session administrator (session_move and the R
handlers below run the message flow of Fig. 4 and keep the commit point), the adapter
coordinator (`_each`: calls the adapters in the order each primitive needs) and the
export/import dispatchers (adapters' GetState into one exchange document, and back).

Commit point: the importing device's ActivateSession. Before the exporting device hears that
it succeeded, any failure makes it resume the session exactly as it was and tells the
importing device to discard; from then on only the importing device runs the session and the
exporting device shuts its part down silently.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sessmob.adapters.application import ApplicationAdapter, AppServer, ImporterSpec
from sessmob.adapters.base import Adapter, Refused, Role, TransferOffer
from sessmob.adapters.net_addr import NetAddrAdapter
from sessmob.adapters.tcp import TcpAdapter
from sessmob.adapters.udp import UdpAdapter
from sessmob.cpu_awake import CpuAwake, Hold
from sessmob.exchange import AppState, ExchangeDoc, FlowState, Limits, decode, encode, validate
from sessmob.hotpath import gc_paused, settle
from sessmob.rm.config import Config, ConfigError, load
from sessmob.rm.control import ControlServer, MoveError
from sessmob.rm.journal import ActivationJournal
from sessmob.rm.peer import (
    ABORT,
    PeerClient,
    PeerError,
    PeerLost,
    PeerTimeout,
    ReplyLost,
    Reservation,
    serve_peers,
)
from sessmob.rm.transport import Listener, PlainTransport
from sessmob.session import Flow, FlowKind, ServiceSession, SessionState

log = logging.getLogger("sessmob.rm")

LEASE_MARGIN = 0.1  # of a reservation's lifetime: ED's and ID's clocks may run at other rates
ASK_AGAIN = 0.2  # s between an in-doubt ED's attempts to reach ID
STALL_FAULT = 3.0  # s the fault import:rm.stall hangs the whole RM for, on a transfer
SLOW_FAULT = 2.5  # s the fault import:rm.slow_activation delays an activation by
DEAF_FAULT = 3.0  # s the fault import:rm.deaf_after_activation stops listening on R for


class Timeline:
    """Durations of the steps of one migration (ms), in the order they ran."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.t_mig_start: float | None = None
        self.t_mig_ms: float | None = None

    async def run(self, step: str, work: Awaitable[Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return await work
        finally:
            self.steps.append({"step": step, "ms": round((time.perf_counter() - t0) * 1e3, 3)})

    def as_dict(self, session: str, device: str) -> dict[str, Any]:
        return {"session": session, "to": device, "steps": self.steps, "t_mig_ms": self.t_mig_ms}


class _Outcome(enum.Enum):
    """What became of a session whose move failed before ED heard of the commit point."""

    RESUMED = "resumed here"
    TAKEN_OVER = "the importer confirmed it had activated"
    HELD_ELSEWHERE = "no answer, and another node answers for the address"


@dataclass
class _Incoming:
    """ID side: a reservation and, once the document arrived, the session being imported."""

    offer: TransferOffer
    expiry: asyncio.TimerHandle
    deadline: float  # loop time: no activation from then on (ED counts on it when in doubt)
    peer: str | None  # the exporting RM's authenticated name (None on a plain transport)
    awake: Hold  # the CPUs kept awake until activation or discard
    session: ServiceSession | None = None
    activated: bool = False
    busy: bool = False  # a transfer or activation is running: expiry waits for it
    done: list[Adapter] = field(default_factory=list)  # adapters whose set_state ran
    set_state_ms: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # per-adapter SetState times
    # flow id -> (kind, socket) made at reservation and handed to the importer (prepare)
    prepared: dict[str, tuple[str, socket.socket]] = field(default_factory=dict)


class RelocationManager:
    """Session administrator + adapter coordinator + dispatchers for one device."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sessions: dict[str, ServiceSession] = {}
        self._next = 0
        self.net = NetAddrAdapter(cfg.interface, cfg.pool)
        self.tcp = TcpAdapter()
        self.udp = UdpAdapter() if "udp" in cfg.adapters else None
        # The transport adapters in the order every primitive visits them.
        self.transports: list[TcpAdapter | UdpAdapter] = [
            self.tcp,
            *([self.udp] if self.udp else []),
        ]
        self.appserver = AppServer(
            os.path.join(cfg.state_dir, "app.sock"),
            self,
            allowed_uids=cfg.allowed_uids,
            timeout=cfg.app_timeout,
            importers={
                t: ImporterSpec(command=i.command, user=i.user, env=i.env)
                for t, i in cfg.importers.items()
            },
        )
        self.app = ApplicationAdapter(self.appserver)
        self.transport = PlainTransport(source=cfg.listen)
        self.peers: dict[str, PeerClient] = {}
        self._dialing: dict[str, asyncio.Lock] = {}  # one connect per device at a time
        self.incoming: dict[str, _Incoming] = {}
        self.limits = Limits(max_document=cfg.max_document)
        self.control = ControlServer(
            os.path.join(cfg.state_dir, "control.sock"), self, allowed_uids=cfg.allowed_uids
        )
        self._peer_server: Listener | None = None
        self.journal: ActivationJournal | None = None  # opened by start()
        self._background: set[asyncio.Future[None]] = set()
        # Held by each move out (until its window ends) and each reservation in (until
        # activated or discarded); with keep_cpus_awake = "always" also from start to close.
        self.awake = CpuAwake(cfg.keep_cpus_awake != "never")

    # -- life -----------------------------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        await self.appserver.start()
        await self.control.start()
        self.journal = ActivationJournal(os.path.join(self.cfg.state_dir, "activations"))
        self._peer_server = await self._serve_peers()
        if self.cfg.keep_cpus_awake == "always":
            self.awake.hold()  # until close()
        log.info(
            "rm %s: R on [%s]:%d, state in %s",
            self.cfg.device,
            self.cfg.listen,
            self.cfg.port,
            self.cfg.state_dir,
        )

    async def close(self) -> None:
        if self._peer_server is not None:
            self._peer_server.close()
        for p in self.peers.values():
            with contextlib.suppress(Exception):
                await p.close()
        await self.control.close()
        await self.appserver.close()
        for s in list(self.sessions.values()):
            self.net.free(s)
        self.tcp.close()
        if self.udp is not None:
            self.udp.close()
        self.net.close()
        self.awake.close()
        if self.journal is not None:
            self.journal.close()

    async def _serve_peers(self) -> Listener:
        assert self.journal is not None
        return await serve_peers(
            self.transport, self.cfg.listen, self.cfg.port, self, self.journal.entries()
        )

    # -- SessionHost (applications) -------------------------------------------------------

    async def create_session(self, app_id: str, session_type: str) -> ServiceSession:
        self._next += 1
        sid = f"{self.cfg.device}-{self._next}-{uuid.uuid4().hex[:6]}"
        session = ServiceSession(sid, session_type, app_id=app_id)
        in_use = {a.addr for s in self.sessions.values() for a in s.addresses}
        self.net.allocate(session, in_use)
        self.sessions[sid] = session
        log.info("session %s (%s) for %s on %s", sid, session_type, app_id, session.addresses)
        return session

    async def add_flow(self, session_id: str, sock: socket.socket, flow_id: str | None) -> Flow:
        session = self._session(session_id)
        if sock.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            raise ValueError(f"flow socket of type {sock.type!r}: only TCP and UDP move")
        kind = FlowKind.TCP if sock.type == socket.SOCK_STREAM else FlowKind.UDP
        if kind is FlowKind.UDP and self.udp is None:
            raise ValueError("UDP flows cannot move: the udp adapter is not enabled here")
        local = sock.getsockname()[:2]
        mine = {a.addr for a in session.addresses}
        if local[0].removeprefix("::ffff:") not in mine:
            raise ValueError(
                f"flow bound to {local[0]}, not to the session's address "
                f"({', '.join(sorted(mine))}): bind session sockets to it"
            )
        try:
            remote: tuple[str, int] | None = sock.getpeername()[:2]
        except OSError:
            remote = None
        # Flow ids stay unique also on a device the session was imported into.
        taken = [int(f.flow_id[1:]) for f in session.flows if f.flow_id[1:].isdigit()]
        n = max([session.meta.get("next_flow", 0), *(t + 1 for t in taken)])
        session.meta["next_flow"] = n + 1
        fid = flow_id or f"f{n}"
        if any(f.flow_id == fid for f in session.flows):
            raise ValueError(f"session {session_id} already has a flow {fid!r}")
        flow = Flow(fid, kind, sock, local, remote)
        session.flows.append(flow)
        return flow

    async def close_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            for f in session.flows:
                if f.sock is not None:
                    f.sock.close()
            self.net.free(session)

    # -- ControlHandler (interface U) -------------------------------------------------------

    async def session_list(self) -> list[dict[str, Any]]:
        return [s.summary() for s in self.sessions.values()]

    async def session_show(self, session_id: str) -> dict[str, Any]:
        return self._session(session_id).summary()

    async def device_list(self) -> list[dict[str, Any]]:
        me = {"device": self.cfg.device, "host": self.cfg.listen, "port": self.cfg.port}
        return [{**me, "self": True}] + [
            {"device": d.name, "host": d.host, "port": d.port, "self": False}
            for d in self.cfg.devices.values()
        ]

    def _session(self, session_id: str) -> ServiceSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"no session {session_id!r} on {self.cfg.device}") from None

    async def _peer(self, device: str) -> PeerClient:
        """The channel to `device`, shared by the moves to it; made on first use (and again
        once dropped), by one of them only."""
        d = self.cfg.devices.get(device)
        if d is None:
            known = ", ".join(sorted(self.cfg.devices)) or "none configured"
            raise MoveError("Connect", f"unknown device {device!r} (known: {known})", {})
        async with self._dialing.setdefault(device, asyncio.Lock()):
            peer = self.peers.get(device)
            if peer is None or peer.closed:
                peer = await PeerClient.connect(
                    self.transport,
                    d.host,
                    d.port,
                    timeout=self.cfg.peer_timeout,
                    call_timeout=self.cfg.peer_timeout,
                )
                self.peers[device] = peer
        return peer

    async def _drop_peer(self, device: str, peer: PeerClient | None) -> None:
        """Close a channel that failed (timed out, broke) so the next move dials anew: ID
        then aborts what this channel still held reserved at once, not at expiry. A move
        sharing it meanwhile fails before its commit point and resumes here."""
        if peer is None:
            return
        if self.peers.get(device) is peer:
            del self.peers[device]
        with contextlib.suppress(Exception):
            await peer.close()

    async def session_move(self, session_id: str, device: str) -> dict[str, Any]:
        """Move a session to `device`: the message flow of Fig. 4, timed step by step."""
        session = self._session(session_id)
        if session.state is not SessionState.ACTIVE:
            raise MoveError("Move", f"session {session_id} is {session.state}, not active", {})
        if device == self.cfg.device:
            raise MoveError("Move", f"session {session_id} is already on {device}", {})
        tl = Timeline()
        session.state = SessionState.MOVING
        awake = self.awake.hold()
        try:
            return await self._move(session, device, tl, awake)
        finally:
            awake.release()  # idempotent: usually the end of the window released it
            if session.state is SessionState.MOVING:
                session.state = SessionState.ACTIVE

    async def _move(
        self, s: ServiceSession, device: str, tl: Timeline, awake: Hold
    ) -> dict[str, Any]:
        step = "Connect"
        peer: PeerClient | None = None
        try:
            peer = await tl.run(step, self._peer(device))
            step = "GetResources"
            self._check_exportable(s)
            offer = TransferOffer(s.session_id, s.session_type, self.cfg.device)
            for a in self._adapters():
                offer.resources[a.name] = await a.get_resources(s)
            step = "CheckPreconditions"
            res: Reservation = await tl.run(step, peer.check_preconditions(offer))
            # ID made the reservation before this reply left, and activates only before it
            # expires: from here on (with a margin for clock rates) it certainly cannot.
            lease_end = time.monotonic() + res.expires_in * (1 + LEASE_MARGIN)
            step = "DoPresignaling"
            await tl.run(step, self._each("do_presignaling", s, Role.EXPORT))
            if self.cfg.delay_after_check:
                await asyncio.sleep(self.cfg.delay_after_check)
        except MoveError:
            raise
        except Exception as e:
            if isinstance(e, ConnectionError | TimeoutError):
                await self._drop_peer(device, peer)  # reconnect next time
            raise MoveError(step, _reason(e), tl.as_dict(s.session_id, device)) from e
        # ---- the freeze window: t_Mig ----
        t0 = time.perf_counter()
        reached: list[Adapter] = []
        note: str | None = None
        failed: MoveError | None = None  # shut down here without knowing that ID has it
        with gc_paused():
            try:
                step = "Suspend"
                await tl.run(step, self._suspend(s, reached))
                step = "GetState"
                doc = await tl.run(step, self._export(s))
                # InitiateSessionTransfer and ActivateSession in one round trip: ID activates
                # only if SetState succeeded on every adapter.
                step = "InitiateSessionTransfer+ActivateSession"
                remote = await tl.run(step, peer.transfer_and_activate(res.reservation_id, doc))
            except Exception as e:
                reason = _reason(e)
                # No answer to the transfer: ID may have activated. Anything else means it
                # did not (an error reply, or a failure before the transfer left).
                in_doubt = step.startswith("Initiate") and isinstance(e, PeerLost | PeerTimeout)
                outcome, holder = await self._undo_export(
                    s, device, peer, res, f"{step}: {reason}", reached, in_doubt, lease_end
                )
                tl.t_mig_ms = round((time.perf_counter() - t0) * 1e3, 3)
                if outcome is _Outcome.RESUMED:
                    raise MoveError(step, reason, tl.as_dict(s.session_id, device)) from e
                remote = {}
                if outcome is _Outcome.TAKEN_OVER:
                    note = (
                        f"{step}: {reason}; {device} then confirmed that it had activated the "
                        "session (its reply was lost)"
                    )
                else:
                    failed = MoveError(
                        step,
                        f"{reason}; {device} did not answer until its reservation had expired, "
                        f"and the session address now answers from another node ({holder})"
                        ": the session may run there, so it was shut down here, not resumed "
                        "(which would put its address on the link twice)",
                        {},
                    )
            else:
                tl.t_mig_ms = round((time.perf_counter() - t0) * 1e3, 3)
        awake.release()
        # ---- committed (or, `failed`, possibly so): the session leaves this device ----
        await tl.run("Shutdown", self._each("shutdown", s, Role.EXPORT, reverse=False))
        s.state = SessionState.GONE
        self.sessions.pop(s.session_id, None)
        out = tl.as_dict(s.session_id, device)
        if failed is not None:
            raise MoveError(failed.step, failed.reason, out)
        out["importer_steps"] = remote
        if note:
            out["note"] = note
        log.info("session %s moved to %s: t_Mig %.3f ms", s.session_id, device, tl.t_mig_ms)
        return out

    def _check_exportable(self, s: ServiceSession) -> None:
        """The exchange document's fixed parts (ids, names, addresses), validated before the
        freeze: the export inside the window then only adds what it dumped."""
        skeleton = ExchangeDoc(
            session_id=s.session_id,
            session_type=s.session_type,
            source=self.cfg.device,
            addresses=[str(a) for a in s.addresses],
            apps=[AppState(s.session_type, b"")],
        )
        validate(skeleton, self.limits)

    def _fault(self, side: str, adapter: Adapter, primitive: str) -> None:
        """Fault injection for the failure-path tests ([faults] in the config)."""
        if self._faulty(f"{side}:{adapter.name}.{primitive}"):
            raise RuntimeError(f"injected fault at {side}:{adapter.name}.{primitive}")

    def _faulty(self, name: str) -> bool:
        return bool(self.cfg.faults) and name in self.cfg.faults

    async def _suspend(self, s: ServiceSession, reached: list[Adapter]) -> None:
        # The application is asked first and, while it parks, the address leaves (isolation:
        # nothing arrives any more, and the output guard keeps what the application still
        # writes from going out — it stays queued in the socket). The sockets freeze once the
        # application has answered: a socket in repair mode still ACKs what arrives, so
        # isolation comes first. `reached` gets every adapter whose suspend was entered (a
        # failed one may have half-happened).
        self._fault("export", self.app, "suspend")
        reached.append(self.app)
        parked = await self.app.start_suspend(s)
        try:
            self._fault("export", self.net, "suspend")
            reached.append(self.net)
            await self.net.suspend(s)
        except BaseException:
            with contextlib.suppress(Exception):
                await parked  # let the application finish parking before it is resumed
            raise
        await parked
        for a in self._carrying(s.flows):
            self._fault("export", a, "suspend")
            reached.append(a)
            await a.suspend(s)

    async def _export(self, s: ServiceSession) -> bytes:
        doc = ExchangeDoc(
            session_id=s.session_id, session_type=s.session_type, source=self.cfg.device
        )
        for a in (self.net, *self._carrying(s.flows), self.app):
            self._fault("export", a, "get_state")
            await a.get_state(s, doc)
        # Checked before the freeze (_check_exportable) or dumped by our own helper; ID
        # validates the whole document anyway.
        return encode(doc, limits=self.limits, validate=False)

    async def _undo_export(
        self,
        s: ServiceSession,
        device: str,
        peer: PeerClient,
        res: Reservation,
        reason: str,
        reached: list[Adapter],
        in_doubt: bool,
        lease_end: float,
    ) -> tuple[_Outcome, str | None]:
        """Before the commit point: the importer discards, the session resumes here.

        Unless the importer reports that it had activated (its reply was lost): the session is
        then its own (TAKEN_OVER). And when the importer never answered (in doubt until its
        lease ran out), the session resumes only if no other node answers for its address:
        one that does (HELD_ELSEWHERE, with "address at MAC") may be the importer running it,
        and resuming would put the address on the link twice. Nothing is resumed in either
        case; the caller shuts the session down here.
        """
        answer = await self._importer_activated(device, peer, res, reason, in_doubt, lease_end)
        if answer:
            log.error("session %s: %s reports it is active (reply lost); shutting down here",
                      s.session_id, device)  # fmt: skip
            return _Outcome.TAKEN_OVER, None
        if answer is None:
            holder = await self.net.held_elsewhere(s)
            if holder is not None:
                log.error("session %s: no answer from %s, and %s: shutting down here",
                          s.session_id, device, holder)  # fmt: skip
                return _Outcome.HELD_ELSEWHERE, holder
        # Address back first, then the sockets leave repair mode, then the application;
        # only what the suspend reached.
        for a in (self.net, *self.transports, self.app):
            if a in reached:
                await a.resume(s, Role.EXPORT)
        return _Outcome.RESUMED, None

    async def _importer_activated(
        self,
        device: str,
        peer: PeerClient,
        res: Reservation,
        reason: str,
        in_doubt: bool,
        lease_end: float,
    ) -> bool | None:
        """Abort the reservation on ID, and learn from the answer whether ID had activated
        (None: no answer came although in doubt).

        Not in doubt (the failure came before the transfer left, or ID answered it): one Abort
        on the channel, best effort. In doubt (the transfer left, no answer came): the session
        stays frozen here, since resuming it while ID may run it would make two owners, and
        the Abort is repeated — on a new channel once this one is lost — until ID answers or
        its reservation has certainly expired (`lease_end`), after which ID cannot activate.
        """
        rid = res.reservation_id
        client: PeerClient | None = peer
        while True:
            left = lease_end - time.monotonic()
            if client is not None:
                try:
                    await client.abort(rid, reason, timeout=max(left, 0.2) if in_doubt else None)
                    return False
                except PeerError as e:
                    return e.step == ABORT and "activated" in e.reason
                except Exception as e:
                    failure = _reason(e)
                    await self._drop_peer(device, client)
            left = lease_end - time.monotonic()
            if not in_doubt:
                log.warning("abort of %s not delivered: %s", rid, failure)
                return False
            if left <= 0:
                log.error("abort of %s unanswered until its reservation expired (%s)",
                          rid, failure)  # fmt: skip
                return None
            await asyncio.sleep(min(ASK_AGAIN, left))
            try:
                client = await self._peer(device)
            except Exception as e:
                client, failure = None, _reason(e)

    def _carrying(self, flows: Iterable[Flow | FlowState]) -> list[Adapter]:
        """The transport adapters with flows among `flows`: the others have nothing to do
        inside the freeze window and are not called there."""
        kinds = {f.kind for f in flows}
        return [a for a in self.transports if a.name in kinds]

    def _adapters(self) -> list[Adapter]:
        return [self.app, self.net, *self.transports]

    async def _each(
        self, primitive: str, s: ServiceSession, role: Role, reverse: bool = False
    ) -> None:
        adapters = self._adapters()
        if primitive == "shutdown":
            # Transport first: sockets released in repair mode before the application
            # closes its own descriptors (the last close must be silent).
            adapters = [*self.transports, self.app, self.net]
        for a in reversed(adapters) if reverse else adapters:
            fn: Callable[[ServiceSession, Role], Awaitable[None]] = getattr(a, primitive)
            await fn(s, role)

    # -- PeerHandler (interface R, importing side) ----------------------------------------

    async def check_preconditions(self, offer: TransferOffer, peer: str | None) -> Reservation:
        done: list[Adapter] = []
        try:
            for a in self._adapters():
                await a.reserve_resources(offer)
                done.append(a)
        except BaseException:
            for a in done:
                with contextlib.suppress(Exception):
                    await a.release_resources(offer)
            raise
        prepared = await self._prepare_import(offer)
        rid = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(
            self.cfg.reservation_timeout,
            lambda: asyncio.ensure_future(self._expire(rid)),
        )
        deadline = loop.time() + self.cfg.reservation_timeout
        self.incoming[rid] = _Incoming(
            offer, expiry, deadline, peer, self.awake.hold(), prepared=prepared
        )
        return Reservation(rid, self.cfg.reservation_timeout)

    async def _prepare_import(self, offer: TransferOffer) -> dict[str, tuple[str, socket.socket]]:
        """Before the freeze: fresh sockets for the offered flows, handed to the reserved
        importer now. Inside the window only the state then has to reach it, and it takes
        the state in while the RM restores into those sockets. Any trouble here only means
        the plain import (sockets made, then handed over, inside the window)."""
        made: dict[str, tuple[str, socket.socket]] = {}
        try:
            self._fault("import", self.app, "prepare")
            for maker in self.transports:
                for fid, sock in maker.prepare_sockets(offer).items():
                    if fid in made:
                        sock.close()
                        raise ValueError(f"flow {fid!r} offered twice")
                    made[fid] = (maker.name, sock)
            if made:
                flows = [(fid, kind, sock.fileno()) for fid, (kind, sock) in made.items()]
                await self.app.prepare(offer, flows)
        except Exception as e:
            log.info("session %s: import not prepared (%s)", offer.session_id, _reason(e))
            _close_prepared(made)
            return {}
        return made

    @staticmethod
    def _prepared_for(inc: _Incoming, doc: ExchangeDoc) -> bool:
        """The prepared sockets are exactly the document's flows (kinds and families too):
        the flows may have changed between the check and the freeze."""
        have = {fid: (kind, sock.family) for fid, (kind, sock) in inc.prepared.items()}
        want: dict[str, tuple[str, int]] = {}
        for fs in doc.flows:
            state = fs.tcp if fs.tcp is not None else fs.udp
            want[fs.flow_id] = (str(fs.kind), state.family if state is not None else -1)
        return bool(have) and have == want

    def _incoming(self, rid: str) -> _Incoming:
        inc = self.incoming.get(rid)
        if inc is None:
            raise Refused("rm", f"unknown or expired reservation {rid}")
        return inc

    async def initiate_transfer(self, reservation_id: str, document: bytes) -> None:
        inc = self._incoming(reservation_id)
        if inc.session is not None:
            raise Refused("rm", f"reservation {reservation_id} already has a session")
        if self._faulty("import:rm.stall"):
            time.sleep(STALL_FAULT)  # the whole RM hangs: unreachable, as if cut off
        await self._refuse_if_expired(reservation_id, inc, "the transfer")
        inc.busy = True
        try:
            await self._initiate_transfer(reservation_id, inc, document)
        finally:
            inc.busy = False

    async def _initiate_transfer(
        self, reservation_id: str, inc: _Incoming, document: bytes
    ) -> None:
        doc = decode(document, self.limits)
        if doc.session_id != inc.offer.session_id:
            raise Refused(
                "rm", f"document for {doc.session_id}, reservation for {inc.offer.session_id}"
            )
        s = ServiceSession(doc.session_id, doc.session_type, state=SessionState.IMPORTING)
        inc.session = s
        t = time.perf_counter()
        carrying = self._carrying(doc.flows)
        if self._prepared_for(inc, doc):
            await self._set_state_prepared(inc, s, doc, carrying)
            inc.set_state_ms = round((time.perf_counter() - t) * 1e3, 3)
            return
        # The plain import: sockets made here, handed over with the state. The importer
        # drops any it was prepared with.
        _close_prepared(inc.prepared)
        inc.prepared = {}
        # Address first (restored sockets bind to it), the application last (it gets the
        # restored sockets and the state, but uses them only after activation).
        await self._set_states(inc, s, doc, [self.net, *carrying, self.app])
        inc.set_state_ms = round((time.perf_counter() - t) * 1e3, 3)

    async def _set_states(
        self, inc: _Incoming, s: ServiceSession, doc: ExchangeDoc, adapters: list[Adapter]
    ) -> None:
        """SetState on `adapters` in order, each timed (`inc.parts`) and noted in `inc.done`
        (what a discard must undo)."""
        for a in adapters:
            inc.done.append(a)
            self._fault("import", a, "set_state")
            t_a = time.perf_counter()
            await a.set_state(s, doc)
            inc.parts[f"set_state_{a.name}_ms"] = round((time.perf_counter() - t_a) * 1e3, 3)

    async def _set_state_prepared(
        self, inc: _Incoming, s: ServiceSession, doc: ExchangeDoc, carrying: list[Adapter]
    ) -> None:
        """SetState with the importer holding the sockets already: the state goes to it
        first, and it takes it in while the address is added and the sockets restored."""
        s.meta["prepared"] = {fid: sock for fid, (_, sock) in inc.prepared.items()}
        flows = [(fs.flow_id, str(fs.kind)) for fs in doc.flows]
        inc.done.append(self.app)
        self._fault("import", self.app, "set_state")
        t_app = time.perf_counter()
        imported = await self.app.start_set_state(s, doc, flows, prepared=True)
        try:
            await self._set_states(inc, s, doc, [self.net, *carrying])
        except BaseException:
            with contextlib.suppress(Exception):
                await imported  # the importer finishes before it is told to drop the session
            raise
        t_wait = time.perf_counter()
        await imported
        now = time.perf_counter()
        # From sending the state to the answer (overlapping the others), and what was left
        # of it once the others were done.
        inc.parts["set_state_application_ms"] = round((now - t_app) * 1e3, 3)
        inc.parts["set_state_application_wait_ms"] = round((now - t_wait) * 1e3, 3)

    async def activate_session(self, reservation_id: str) -> dict[str, float]:
        inc = self._incoming(reservation_id)
        s = inc.session
        if s is None:
            raise Refused("rm", f"reservation {reservation_id} has no transferred session")
        times: dict[str, float] = {"set_state_ms": inc.set_state_ms, **inc.parts}
        if self._faulty("import:rm.slow_activation"):
            await asyncio.sleep(SLOW_FAULT)  # ED's wait for the reply runs out first
        await self._refuse_if_expired(reservation_id, inc, "activation")
        t = time.perf_counter()
        inc.busy = True
        try:
            for a in (self.net, self.tcp):
                self._fault("import", a, "resume")
                await a.resume(s, Role.IMPORT)
        except Exception:
            await self._discard(reservation_id)
            raise
        finally:
            inc.busy = False
        # Committed: from here the session is this device's. Written down before the reply
        # leaves, so that a restarted RM still answers "already activated".
        inc.activated = True
        if self.journal is not None:
            try:
                self.journal.record(reservation_id, inc.peer)
            except OSError as e:
                log.error("activation of %s not recorded: %s", reservation_id, e)
        inc.expiry.cancel()
        t_post = time.perf_counter()
        times["activate_ms"] = round((t_post - t) * 1e3, 3)
        errors = []
        carrying = self._carrying(s.flows)
        post = [(a.name, a.resume(s, Role.IMPORT)) for a in carrying if a is not self.tcp]
        post.append(("announce", self.net.do_postsignaling(s, Role.IMPORT)))
        for name, work in post:
            try:
                await work
            except Exception as e:  # past the commit point: report, never roll back
                errors.append(f"{name}: {_reason(e)}")
                log.error("session %s after activation, %s: %s", s.session_id, name, e)
        # The application's resume goes out now; its acknowledgement is not waited for
        # before replying (it changes nothing: the session runs here either way).
        try:
            acknowledged = await self.app.start_resume(s)
        except Exception as e:
            errors.append(f"application resume: {_reason(e)}")
            log.error("session %s after activation, application resume: %s", s.session_id, e)
        else:
            resumed = asyncio.ensure_future(acknowledged)
            self._background.add(resumed)  # keep it alive until done
            resumed.add_done_callback(lambda f: self._after_resume(s, f))
        times["postsignaling_ms"] = round((time.perf_counter() - t_post) * 1e3, 3)
        s.state = SessionState.ACTIVE
        self.sessions[s.session_id] = s
        self.incoming.pop(reservation_id, None)
        asyncio.get_running_loop().call_soon(inc.awake.release)  # once the reply is out
        await self.app.release_resources(inc.offer)
        if errors:
            times["post_commit_errors"] = float(len(errors))
        if self._faulty("import:rm.crash_after_activation"):
            os._exit(70)  # the RM dies before its reply; the importer runs on
        deaf = self._faulty("import:rm.deaf_after_activation")
        if deaf:
            self._go_deaf(DEAF_FAULT)
        if deaf or self._faulty("import:rm.activated_reply"):
            raise ReplyLost(f"injected fault: reply to the activation of {reservation_id} lost")
        return times

    async def _refuse_if_expired(self, reservation_id: str, inc: _Incoming, what: str) -> None:
        """The lease: nothing is taken in or activated once the reservation's time is up, even
        if its expiry timer has not had its turn (ED, in doubt, may have resumed by then)."""
        if asyncio.get_running_loop().time() >= inc.deadline:
            await self._discard(reservation_id)
            raise Refused("rm", f"reservation {reservation_id} expired before {what}")

    def _go_deaf(self, seconds: float) -> None:
        """Fault injection: stop listening on R for `seconds`, as if cut off, then again."""
        if self._peer_server is not None:
            self._peer_server.close()

        async def again() -> None:
            await asyncio.sleep(seconds)
            self._peer_server = await self._serve_peers()

        task = asyncio.ensure_future(again())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _after_resume(self, s: ServiceSession, f: asyncio.Future[None]) -> None:
        self._background.discard(f)
        if not f.cancelled() and f.exception() is not None:
            log.error("session %s: application resume failed: %s", s.session_id, f.exception())

    def may_hold_loop(self) -> bool:
        return not any(inc.busy for inc in self.incoming.values()) and not any(
            s.state is SessionState.MOVING for s in self.sessions.values()
        )

    async def abort(self, reservation_id: str, reason: str) -> None:
        inc = self.incoming.get(reservation_id)
        if inc is None:
            return  # already gone (expired or never made): nothing to undo
        if inc.activated:
            raise Refused("rm", "session already activated here")
        log.info("abort %s: %s", reservation_id, reason)
        await self._discard(reservation_id)

    async def _expire(self, rid: str) -> None:
        inc = self.incoming.get(rid)
        if inc is not None and inc.busy:
            # Never in the middle of a transfer: once it ends, activation checks the deadline
            # itself, and a failed one is aborted by ED or when its channel closes.
            inc.expiry = asyncio.get_running_loop().call_later(
                0.05, lambda: asyncio.ensure_future(self._expire(rid))
            )
            return
        if inc is not None and not inc.activated:
            log.warning("reservation %s expired: no transfer followed", rid)
            await self._discard(rid)

    async def _discard(self, rid: str) -> None:
        inc = self.incoming.pop(rid, None)
        if inc is None:
            return
        inc.expiry.cancel()
        inc.awake.release()
        if inc.session is not None:
            for a in reversed(inc.done):
                try:
                    await a.shutdown(inc.session, Role.IMPORT)
                except Exception as e:
                    log.warning("discarding %s in %s: %s", inc.session.session_id, a.name, e)
        _close_prepared(inc.prepared)  # our copies of sockets never restored (the rest: above)
        for a in self._adapters():
            with contextlib.suppress(Exception):
                await a.release_resources(inc.offer)


def _close_prepared(prepared: dict[str, tuple[str, socket.socket]]) -> None:
    for _, sock in prepared.values():
        sock.close()


def _reason(e: BaseException) -> str:
    if isinstance(e, PeerError):
        return e.reason
    text = str(e) or type(e).__name__
    return text if isinstance(e, Refused | OSError | ValueError) else f"{type(e).__name__}: {text}"


async def _run(cfg: Config) -> None:
    rm = RelocationManager(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await rm.start()
    settle()
    try:
        await stop.wait()
    finally:
        await rm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="sessmob rm", description="Run this device's Relocation Manager (foreground)."
    )
    ap.add_argument("--config", required=True, help="TOML configuration file")
    ap.add_argument(
        "--state-dir",
        default=os.environ.get("SESSMOB_STATE_DIR", "/run/sessmob"),
        help="directory for sockets and keys (default /run/sessmob, env SESSMOB_STATE_DIR)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        cfg = load(args.config, args.state_dir)
    except ConfigError as e:
        print(f"sessmob rm: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(cfg))
    except (OSError, RuntimeError, ValueError) as e:
        # Start-up failures: interface missing, nft absent, address in use, socket taken...
        print(f"sessmob rm: {e}", file=sys.stderr)
        return 1
    return 0
