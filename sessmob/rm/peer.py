"""Interface R: the exporting RM (ED) drives a move on the importing RM (ID).

Four requests, each answered by exactly one reply with the same "id" (docs/protocols.md):

    check     CheckPreconditions       offer            -> reserved {rid, ttl} | refused | error
    transfer  InitiateSessionTransfer  rid, p=document  -> done | error
              (with "go": true also ActivateSession  -> activated {ms} | error)
    activate  ActivateSession          rid              -> activated {ms} | error
    abort     Abort                    rid, reason      -> done | error

Only `transfer` and `activate` sit inside the freeze window: one round trip each (or one in
all with `transfer_and_activate`), the document as one binary field. The ED connects and checks
before it freezes anything and reuses that channel.

A reservation belongs to the channel that obtained it: another channel cannot transfer,
activate or abort it ("unknown reservation"), and when the channel closes, every reservation
it holds that was not activated or aborted is aborted on ID at once instead of waiting for its
expiry. After activation (the commit point) a reservation is closed: a late Abort is refused.

Frames that are malformed, of an unknown type, or otherwise unexpected close the channel with
a logged reason (the peer first gets an "error" with id 0 saying why); nothing a peer sends can
stop the server or disturb other channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sessmob.adapters.base import Refused, TransferOffer
from sessmob.hotpath import gc_paused
from sessmob.rm.transport import Channel, Listener, Transport
from sessmob.rm.wire import WireError, field

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SOCKET_WAIT = 0.05  # seconds a call inside the freeze window waits on the socket, loop held
TRANSFER_WAIT = 0.02  # seconds ID waits on the socket for the transfer after a reservation

CHECK = "CheckPreconditions"
TRANSFER = "InitiateSessionTransfer"
ACTIVATE = "ActivateSession"
ABORT = "Abort"
CONNECT = "Connect"

# request type -> step it implements
REQUESTS = {"check": CHECK, "transfer": TRANSFER, "activate": ACTIVATE, "abort": ABORT}
REPLIES = frozenset({"reserved", "done", "activated", "refused", "error"})


@dataclass
class Reservation:
    """ID holds the resources for `expires_in` seconds; the transfer must follow within that."""

    reservation_id: str
    expires_in: float


class PeerError(RuntimeError):
    """The other RM refused (`refused` True: a precondition does not hold) or failed a step."""

    def __init__(
        self, step: str, reason: str, *, adapter: str | None = None, refused: bool = False
    ) -> None:
        self.step = step
        self.reason = f"{adapter}: {reason}" if adapter else reason
        self.adapter = adapter
        self.refused = refused
        verb = "refused" if refused else "failed"
        super().__init__(f"{step} {verb} on peer: {self.reason}")


class PeerLost(ConnectionError):
    """The channel to the other RM broke (or could not be made) during `step`."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step}: {reason}")


class PeerTimeout(TimeoutError):
    """The other RM did not answer `step` in time; its outcome on the peer is unknown."""

    def __init__(self, step: str, timeout: float) -> None:
        self.step = step
        self.reason = f"no reply from peer within {timeout:g} s"
        super().__init__(f"{step}: {self.reason}")


class PeerHandler(Protocol):
    """The importing side of a move, implemented by the RM daemon."""

    async def check_preconditions(self, offer: TransferOffer, peer: str | None) -> Reservation:
        """Reserve what `offer` needs; raise Refused if a precondition does not hold.

        `peer` is the authenticated device name of the exporting RM (None on a plain transport).
        """
        ...

    async def initiate_transfer(self, reservation_id: str, document: bytes) -> None:
        """SetState on every adapter from the exchange document (nothing runs yet)."""
        ...

    async def activate_session(self, reservation_id: str) -> dict[str, float]:
        """The commit point: the session runs here from now on. Returns ID-side timings (ms)."""
        ...

    async def abort(self, reservation_id: str, reason: str) -> None:
        """Discard the import and release the reservation. Called also for a reservation whose
        activation raised, and when the channel closes before activation."""
        ...

    def may_hold_loop(self) -> bool:
        """Whether the server may wait for a transfer on its socket with the event loop held
        (at most TRANSFER_WAIT): not while another move of this RM runs in that loop."""
        ...


class ProtocolViolation(WireError):
    """A well-framed message that is not a valid R message here."""


class ReplyLost(Exception):
    """Raised by a handler whose work is done to have its reply dropped and the channel
    closed: a reply lost on the way (fault injection, for the tests of ED's recovery)."""


# ---------------------------------------------------------------------------------------------
# ED side


class PeerClient:
    """The ED's handle on one ID: connect before the freeze, then reuse the channel.

    Every call has a timeout (`call_timeout`, or the call's own `timeout`). A lost channel
    raises PeerLost (a ConnectionError), no reply in time PeerTimeout (a TimeoutError), a
    refusal or failure on ID PeerError — each naming the step. After a timeout or loss the
    outcome on ID is unknown; abort (or let the reservation expire) before resuming.
    """

    def __init__(self, channel: Channel, *, call_timeout: float = 5.0) -> None:
        self.channel = channel
        self.call_timeout = call_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._closed_reason: str | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    @classmethod
    async def connect(
        cls,
        transport: Transport,
        host: str,
        port: int,
        *,
        timeout: float = 2.0,
        call_timeout: float = 5.0,
    ) -> PeerClient:
        """Open the channel to the RM at host:port (`timeout` covers any handshake)."""
        try:
            channel = await transport.connect(host, port, timeout=timeout)
        except TimeoutError:
            raise PeerTimeout(CONNECT, timeout) from None
        except OSError as e:
            raise PeerLost(CONNECT, f"cannot reach the RM at {host}:{port}: {e}") from e
        return cls(channel, call_timeout=call_timeout)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def check_preconditions(
        self, offer: TransferOffer, *, timeout: float | None = None
    ) -> Reservation:
        """ID checks and reserves what the session needs (before the freeze)."""
        req = {
            "t": "check",
            "v": PROTOCOL_VERSION,
            "offer": {
                "session_id": offer.session_id,
                "session_type": offer.session_type,
                "source": offer.source,
                "resources": offer.resources,
            },
        }
        reply = await self._call(CHECK, req, "reserved", timeout)
        try:
            rid = field(reply, "rid", str)
            ttl = field(reply, "ttl", int, float)
        except WireError as e:
            raise await self._violation(CHECK, e) from None
        return Reservation(rid, float(ttl))

    async def initiate_transfer(
        self, reservation_id: str, document: bytes, *, timeout: float | None = None
    ) -> None:
        """Hand ID the exchange document; returns once SetState succeeded on every adapter."""
        req = {"t": "transfer", "rid": reservation_id, "p": bytes(document)}
        await self._call(TRANSFER, req, "done", timeout, wait_on_socket=True)

    async def activate_session(
        self, reservation_id: str, *, timeout: float | None = None
    ) -> dict[str, float]:
        """Commit: ID resumes the session. Returns ID-side timings in ms."""
        reply = await self._call(
            ACTIVATE,
            {"t": "activate", "rid": reservation_id},
            "activated",
            timeout,
            wait_on_socket=True,
        )
        return await self._timings(reply)

    async def transfer_and_activate(
        self, reservation_id: str, document: bytes, *, timeout: float | None = None
    ) -> dict[str, float]:
        """InitiateSessionTransfer and ActivateSession in one round trip.

        ID activates only if SetState succeeded; a PeerError's step says which one failed.
        Saves one round trip inside the freeze window when ED has nothing to do in between.
        """
        req = {"t": "transfer", "rid": reservation_id, "p": bytes(document), "go": True}
        reply = await self._call(TRANSFER, req, "activated", timeout, wait_on_socket=True)
        return await self._timings(reply)

    async def abort(
        self, reservation_id: str, reason: str, *, timeout: float | None = None
    ) -> None:
        """ID discards the import and frees the reservation (never after activation)."""
        await self._call(
            ABORT, {"t": "abort", "rid": reservation_id, "reason": reason}, "done", timeout
        )

    async def close(self) -> None:
        """Close the channel; ID aborts any reservation of ours it still holds."""
        self._fail_pending("channel closed by this RM")
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.channel.close()

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals --

    async def _call(
        self,
        step: str,
        req: dict[str, Any],
        expect: str,
        timeout: float | None,
        *,
        wait_on_socket: bool = False,
    ) -> dict[str, Any]:
        if self._closed_reason is not None:
            raise PeerLost(step, self._closed_reason)
        rid = next(self._ids)
        req["id"] = rid
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        limit = self.call_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                try:
                    await self.channel.send(req)
                except OSError as e:  # ConnectionError is one
                    self._fail_pending(f"send failed: {e}")
                    raise PeerLost(step, f"send failed: {e}") from e
                except WireError as e:  # our own message cannot be encoded: nothing was sent
                    raise WireError(f"{step}: {e}") from e
                if wait_on_socket:
                    closing = self._wait_on_socket(fut, min(limit, SOCKET_WAIT))
                    if closing is not None:
                        await self._shut(closing)
                reply = fut.result() if fut.done() else await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                reply = fut.result()  # arrived on the deadline: use it
            else:
                raise PeerTimeout(step, limit) from None
        except _Lost as e:
            raise PeerLost(step, e.reason) from None
        finally:
            self._pending.pop(rid, None)
        t = reply["t"]
        if t == expect:
            return reply
        if t in ("refused", "error"):
            try:
                reason = field(reply, "reason", str)
                where = field(reply, "step", str, optional=True) or step
                adapter = field(reply, "adapter", str, optional=True)
            except WireError as e:
                raise await self._violation(step, e) from None
            raise PeerError(where, reason, adapter=adapter, refused=t == "refused")
        raise await self._violation(
            step, ProtocolViolation(f"reply {t!r} to a {req['t']!r} request")
        )

    async def _timings(self, reply: dict[str, Any]) -> dict[str, float]:
        try:
            ms = field(reply, "ms", dict)
            out: dict[str, float] = {}
            for k, v in ms.items():
                if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
                    raise ProtocolViolation(f"timing {k!r}: {v!r} is not name -> milliseconds")
                out[k] = float(v)
        except WireError as e:
            raise await self._violation(ACTIVATE, e) from None
        return out

    async def _violation(self, step: str, e: WireError) -> PeerLost:
        reason = f"protocol violation by peer: {e}"
        log.warning("R channel %r closed: %s", self.channel, reason)
        await self._shut(reason)
        return PeerLost(step, reason)

    async def _shut(self, reason: str) -> None:
        """End the channel: pending calls fail with `reason`, the reader stops (even one
        that never ran), the socket closes."""
        self._fail_pending(reason)
        self._reader.cancel()
        await self.channel.close()

    def _fail_pending(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(_Lost(reason))
        self._pending.clear()

    async def _read_replies(self) -> None:
        reason = "connection closed by peer"
        try:
            while True:
                msg = await self.channel.recv()
                closing = self._deliver(msg)
                if closing is not None:
                    reason = closing
                    return
        except WireError as e:
            reason = f"protocol violation by peer: {e}"
            log.warning("R channel %r closed: %s", self.channel, reason)
        except OSError as e:  # ConnectionError and socket errors
            reason = str(e) or type(e).__name__
        finally:
            self._fail_pending(reason)
            with contextlib.suppress(Exception):
                await self.channel.close()

    def _deliver(self, msg: dict[str, Any]) -> str | None:
        """Hand a reply to its caller; returns the reason if the peer closes the channel."""
        t = msg["t"]
        if t not in REPLIES:
            raise ProtocolViolation(f"unexpected message type {t!r}")
        if msg["id"] == 0 and t == "error":
            return f"peer closed the channel: {msg.get('reason')!s}"
        fut = self._pending.get(msg["id"])
        if fut is None or fut.done():
            log.info("dropping late %r reply to request %d", t, msg["id"])
        else:
            fut.set_result(msg)
        return None

    def _wait_on_socket(self, fut: asyncio.Future[dict[str, Any]], limit: float) -> str | None:
        """Read replies straight off the channel until `fut` has its own or `limit` seconds
        pass (the loop is held meanwhile). A channel that fails to read is left to the reader
        task, which meets the same error on its next read. Returns the reason if a reply
        ends the channel (the caller then shuts it, as the reader would)."""
        deadline = time.monotonic() + limit
        while not fut.done():
            left = deadline - time.monotonic()
            try:
                msg = self.channel.recv_now(left) if left > 0 else None
            except (WireError, OSError):
                return None
            if msg is None:
                return None
            try:
                closing = self._deliver(msg)
            except ProtocolViolation as e:
                closing = f"protocol violation by peer: {e}"
                log.warning("R channel %r closed: %s", self.channel, closing)
            if closing is not None:
                return closing
        return None


class _Lost(Exception):
    """Internal: set on pending futures when the channel goes; _call turns it into PeerLost."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# ---------------------------------------------------------------------------------------------
# ID side


async def serve_peers(
    transport: Transport,
    host: str,
    port: int,
    handler: PeerHandler,
    activated: Iterable[tuple[str, str | None]] = (),
) -> Listener:
    """Accept other RMs on host:port and run their requests against `handler`.

    `activated`: reservations activated before this server started, (id, peer name) each, so
    that an Abort naming one is answered "already activated" (sessmob.rm.journal)."""
    registry = _Registry()
    for rid, peer_name in activated:
        registry.entries[rid] = _Entry(None, peer_name, ACTIVATED)

    async def on_channel(channel: Channel) -> None:
        await _PeerSession(channel, handler, registry).run()

    return await transport.serve(host, port, on_channel)


def parse_offer(msg: dict[str, Any]) -> TransferOffer:
    """The TransferOffer of a check request, every field type-checked (ProtocolViolation)."""
    offer = field(msg, "offer", dict)
    try:
        sid = field(offer, "session_id", str)
        stype = field(offer, "session_type", str)
        source = field(offer, "source", str)
        resources = field(offer, "resources", dict)
    except WireError as e:
        raise ProtocolViolation(f"offer: {e}") from None
    for name, needs in resources.items():
        if not isinstance(name, str) or not isinstance(needs, dict):
            raise ProtocolViolation(f"offer: resources[{name!r}] must map a name to a map")
    return TransferOffer(session_id=sid, session_type=stype, source=source, resources=resources)


OPEN, ACTIVATED, ABORTED = "open", "activated", "aborted"


@dataclass
class _Entry:
    channel: Channel | None  # the channel that made it (only it may transfer or activate)
    peer_name: str | None
    state: str = OPEN
    # Held while a request on it runs: an Abort from another channel (ED asking anew after
    # losing the first) waits for a running transfer's outcome instead of racing it.
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


class _Registry:
    """Reservations handed out by one server, across its channels.

    Closed ones are remembered (the newest `keep`) so that an Abort arriving after the commit
    point — e.g. on a new channel after the reply to ActivateSession was lost — is answered
    "already activated" rather than "unknown".
    """

    def __init__(self, keep: int = 1024) -> None:
        self.keep = keep
        self.entries: OrderedDict[str, _Entry] = OrderedDict()

    def add(self, rid: str, channel: Channel) -> None:
        self.entries[rid] = _Entry(channel, channel.peer_name)
        self.entries.move_to_end(rid)
        closed = [k for k, e in self.entries.items() if e.state != OPEN]
        for k in closed[: max(0, len(closed) - self.keep)]:
            del self.entries[k]

    def open_of(self, channel: Channel) -> list[str]:
        return [k for k, e in self.entries.items() if e.channel is channel and e.state == OPEN]


class _PeerSession:
    """One accepted channel: its requests run one at a time, in order."""

    def __init__(self, channel: Channel, handler: PeerHandler, registry: _Registry) -> None:
        self.ch = channel
        self.handler = handler
        self.reg = registry

    async def run(self) -> None:
        msg: dict[str, Any] | None = None
        try:
            while True:
                try:
                    if msg is None:
                        msg = await self.ch.recv()
                    reply = await self._dispatch(msg)
                except (ConnectionError, ReplyLost):
                    return
                except WireError as e:  # a bad frame, or a well-framed but invalid request
                    await self._bye(str(e))
                    return
                try:
                    await self.ch.send(reply)
                except OSError:
                    return
                try:
                    hold = reply["t"] == "reserved" and self.handler.may_hold_loop()
                    msg = self._transfer_now() if hold else None
                except (ConnectionError, WireError):
                    msg = None  # the next recv() meets it again and reports it
        finally:
            await self._abort_open()

    def _transfer_now(self) -> dict[str, Any] | None:
        """After a reservation the transfer usually follows within a millisecond or two: wait
        for it on the socket (a bounded stretch, loop held), so that the freeze window does
        not begin with a trip through the event loop. None: nothing came, use recv()."""
        return self.ch.recv_now(TRANSFER_WAIT)

    async def _abort_open(self) -> None:
        # The exporting RM can no longer activate these (they are bound to this channel):
        # free them now rather than at expiry.
        for rid in self.reg.open_of(self.ch):
            entry = self.reg.entries[rid]
            try:
                async with entry.lock:
                    if entry.state != OPEN:  # an Abort on another channel came first
                        continue
                    await self.handler.abort(
                        rid, "channel to the exporting RM closed before activation"
                    )
                    entry.state = ABORTED
            except Exception as e:
                log.warning("abort of reservation %s after channel close failed: %s", rid, e)

    async def _bye(self, reason: str) -> None:
        log.warning("R channel %r (peer %s) closed: %s", self.ch, self.ch.peer_name, reason)
        with contextlib.suppress(Exception):
            await self.ch.send({"t": "error", "id": 0, "step": "R", "reason": reason})

    async def _dispatch(self, msg: dict[str, Any]) -> dict[str, Any]:
        t, req_id = msg["t"], msg["id"]
        step = REQUESTS.get(t)
        if step is None:
            raise ProtocolViolation(f"unexpected message type {t!r}")
        if req_id == 0:
            raise ProtocolViolation(f"{t!r} request with id 0 (reserved)")
        if t == "check":
            return await self._check(msg, req_id)
        rid = field(msg, "rid", str)
        if t == "transfer":  # validated here, used as they are below
            field(msg, "p", bytes)
            field(msg, "go", bool, optional=True)
        elif t == "abort":
            field(msg, "reason", str)
        entry = self.reg.entries.get(rid)
        if t == "abort":
            if entry is None or entry.peer_name != self.ch.peer_name:
                return _error(req_id, step, f"unknown reservation {rid!r}")
        elif entry is None or entry.channel is not self.ch:
            return _error(
                req_id,
                step,
                f"unknown reservation {rid!r} (never made, expired, or made on another channel)",
            )
        async with entry.lock:  # its outcome, not a race with a request on another channel
            return await self._run_locked(entry, t, rid, req_id, step, msg)

    async def _run_locked(
        self, entry: _Entry, t: str, rid: str, req_id: int, step: str, msg: dict[str, Any]
    ) -> dict[str, Any]:
        if t == "abort":
            if entry.state == ACTIVATED:
                return _error(
                    req_id,
                    step,
                    f"reservation {rid} is already activated: the session runs on "
                    "this device (the commit point has passed)",
                )
            if entry.state == ABORTED:
                return {"t": "done", "id": req_id}
        elif entry.state != OPEN:
            return _error(req_id, step, f"reservation {rid} is already {entry.state}")
        try:
            if t == "transfer":
                with gc_paused():  # inside the freeze window
                    await self.handler.initiate_transfer(rid, msg["p"])
                    if not msg.get("go"):
                        return {"t": "done", "id": req_id}
                    step = ACTIVATE
                    return await self._activate(entry, rid, req_id)
            if t == "activate":
                with gc_paused():
                    return await self._activate(entry, rid, req_id)
            await self.handler.abort(rid, msg["reason"])
            entry.state = ABORTED
            return {"t": "done", "id": req_id}
        except ReplyLost:
            raise
        except Refused as e:
            return _refused(req_id, step, e)
        except Exception as e:
            log.warning("%s for reservation %s failed: %s", step, rid, _describe(e), exc_info=True)
            return _error(req_id, step, _describe(e))

    async def _activate(self, entry: _Entry, rid: str, req_id: int) -> dict[str, Any]:
        try:
            ms = await self.handler.activate_session(rid)
        except ReplyLost:
            entry.state = ACTIVATED
            raise
        entry.state = ACTIVATED  # committed: from here on ID owns the session
        # Past the commit point nothing may turn this into an error reply (ED would resume
        # and the session would run twice): odd timings are dropped, not fatal.
        timings: dict[str, float] = {}
        if isinstance(ms, dict):
            for k, v in ms.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    timings[str(k)] = float(v)
        if ms and (not isinstance(ms, dict) or len(timings) != len(ms)):
            log.warning("activate_session(%s) returned odd timings %r", rid, ms)
        return {"t": "activated", "id": req_id, "ms": timings}

    async def _check(self, msg: dict[str, Any], req_id: int) -> dict[str, Any]:
        version = field(msg, "v", int)
        if version != PROTOCOL_VERSION:
            return _error(
                req_id,
                CHECK,
                f"R protocol version {version} is not supported (this RM speaks "
                f"{PROTOCOL_VERSION}); run the same sessmob release on both devices",
            )
        offer = parse_offer(msg)
        try:
            res = await self.handler.check_preconditions(offer, self.ch.peer_name)
            if not isinstance(res, Reservation) or not isinstance(res.reservation_id, str):
                raise TypeError(f"handler returned {res!r}, not a Reservation")
            if res.reservation_id in self.reg.entries:
                raise ValueError(f"handler reused reservation id {res.reservation_id!r}")
        except Refused as e:
            return _refused(req_id, CHECK, e)
        except Exception as e:
            log.warning(
                "CheckPreconditions for %s failed: %s",
                offer.session_id,
                _describe(e),
                exc_info=True,
            )
            return _error(req_id, CHECK, _describe(e))
        self.reg.add(res.reservation_id, self.ch)
        return {
            "t": "reserved",
            "id": req_id,
            "rid": res.reservation_id,
            "ttl": float(res.expires_in),
        }


def _describe(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1:
        return f"not found: {e.args[0]}"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _error(req_id: int, step: str, reason: str) -> dict[str, Any]:
    return {"t": "error", "id": req_id, "step": step, "reason": reason}


def _refused(req_id: int, step: str, e: Refused) -> dict[str, Any]:
    return {"t": "refused", "id": req_id, "step": step, "adapter": e.adapter, "reason": e.reason}
