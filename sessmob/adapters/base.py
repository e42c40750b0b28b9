"""Interface A: the nine primitives every adapter offers the Relocation Manager.

The adapter coordinator (sessmob.rm) calls them; the order across adapters is the
coordinator's business (isolate before freeze, address before restore, ...), so an adapter
only does its own part. All primitives are coroutines: the application adapter waits on its
application, the kernel-facing ones return at once.

On the exporting device (ED):    get_resources, do_presignaling, suspend, get_state,
                                 resume (only after a failed move), shutdown (after commit)
On the importing device (ID):    reserve_resources, do_presignaling, set_state,
                                 resume (activation), do_postsignaling,
                                 release_resources / discard (abort before activation)
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sessmob.exchange import ExchangeDoc
    from sessmob.session import ServiceSession


class Role(enum.StrEnum):
    EXPORT = "export"
    IMPORT = "import"


class Refused(Exception):
    """A precondition does not hold; `adapter` says whose, the message says why and what to do."""

    def __init__(self, adapter: str, reason: str) -> None:
        self.adapter = adapter
        self.reason = reason
        super().__init__(f"{adapter}: {reason}")


@dataclass
class TransferOffer:
    """What CheckPreconditions carries from ED to ID: every adapter's GetResources."""

    session_id: str
    session_type: str
    source: str  # exporting device's name
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapter -> needs


@runtime_checkable
class Adapter(Protocol):
    """One adapter. `name` keys its entries in offers and exchange documents."""

    name: str

    async def get_resources(self, session: ServiceSession) -> dict[str, Any]:
        """ED: what the session needs on the importing side (JSON-able)."""
        ...

    async def reserve_resources(self, offer: TransferOffer) -> None:
        """ID: check the offer's needs can be met and hold them; raise Refused if not."""
        ...

    async def release_resources(self, offer: TransferOffer) -> None:
        """ID: drop a reservation (transfer aborted, or expired). Idempotent."""
        ...

    async def do_presignaling(self, session: ServiceSession, role: Role) -> None:
        """Both: work that can happen before the freeze (pre-resolve neighbours, ...)."""
        ...

    async def suspend(self, session: ServiceSession) -> None:
        """ED: stop the session's part this adapter owns (quiesce, isolate, freeze)."""
        ...

    async def get_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:
        """ED: add this adapter's part of the session to the exchange document."""
        ...

    async def set_state(self, session: ServiceSession, doc: ExchangeDoc) -> None:
        """ID: build this adapter's part from the document (nothing runs yet)."""
        ...

    async def resume(self, session: ServiceSession, role: Role) -> None:
        """ID: start running (activation). ED: undo suspend after a failed move."""
        ...

    async def do_postsignaling(self, session: ServiceSession, role: Role) -> None:
        """ID after activation: tell the network (NA/ARP, Shim6 update, ...)."""
        ...

    async def shutdown(self, session: ServiceSession, role: Role) -> None:
        """ED after commit: free the session's part silently. ID: discard an import that
        was aborted before activation."""
        ...


def fresh_sockets(offer: TransferOffer, adapter: str, kind: int) -> dict[str, socket.socket]:
    """One new socket per flow of `adapter` in the offer, of the family of its local
    address. ValueError on an offer entry that is not {"flow": str, "local": [addr, port]}."""
    out: dict[str, socket.socket] = {}
    try:
        for entry in offer.resources.get(adapter, {}).get("flows", []):
            fid = entry.get("flow") if isinstance(entry, dict) else None
            local = entry.get("local") if isinstance(entry, dict) else None
            if not isinstance(fid, str) or not isinstance(local, list) or not local:
                raise ValueError(f"{adapter} flow entry {entry!r}")
            family = socket.AF_INET6 if ":" in str(local[0]) else socket.AF_INET
            if fid in out:
                raise ValueError(f"{adapter} flow {fid!r} offered twice")
            out[fid] = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    except BaseException:
        for sock in out.values():
            sock.close()
        raise
    return out
