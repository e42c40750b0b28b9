"""The session model (paper, Fig. 1), as the Relocation Manager holds it.

ServiceSession -> application session (its state part, a blob the application exports) ->
communication flows (5-tuple plus transport state). The network state — the session's own
address, which moves with it — belongs to the service session. Transport state and kernel
handles live here only while the session is on this device; what crosses to another device is
the exchange document (sessmob.exchange).
"""

from __future__ import annotations

import enum
import socket
from dataclasses import dataclass, field
from typing import Any


class FlowKind(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


@dataclass
class Flow:
    """One communication flow of a session, with the RM's own handle on the socket.

    `sock` is the RM's duplicate of the application's socket (received with SCM_RIGHTS): the
    RM freezes and dumps through it; the application keeps its own descriptor.
    """

    flow_id: str  # unique within the session: "f0", "f1", ...
    kind: FlowKind
    sock: socket.socket | None = None
    local: tuple[str, int] | None = None
    remote: tuple[str, int] | None = None  # None: unconnected UDP


@dataclass(frozen=True)
class SessionAddress:
    """The session's own address: moving it moves every flow on it."""

    addr: str
    prefixlen: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.addr else socket.AF_INET

    def __str__(self) -> str:
        return f"{self.addr}/{self.prefixlen}"


class SessionState(enum.StrEnum):
    ACTIVE = "active"  # running on this device
    MOVING = "moving"  # inside a migration (suspended on the exporting device)
    IMPORTING = "importing"  # being set up here, not yet activated
    GONE = "gone"  # moved away (kept briefly for `session show`)


@dataclass
class ServiceSession:
    """A session this device's RM knows about."""

    session_id: str
    session_type: str  # which importer can take it ("echo", ...)
    addresses: list[SessionAddress] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    app_id: str | None = None  # the application connection that owns it on this device
    state: SessionState = SessionState.ACTIVE
    app_state: bytes = b""  # the application's exported state part (filled at GetState)
    meta: dict[str, Any] = field(default_factory=dict)  # adapters' per-session scratch

    def flow(self, flow_id: str) -> Flow:
        for f in self.flows:
            if f.flow_id == flow_id:
                return f
        raise KeyError(f"session {self.session_id} has no flow {flow_id!r}")

    def summary(self) -> dict[str, Any]:
        """What `sessmob session list/show` prints (JSON-able)."""
        return {
            "session": self.session_id,
            "type": self.session_type,
            "state": str(self.state),
            "addresses": [str(a) for a in self.addresses],
            "flows": [
                {
                    "flow": f.flow_id,
                    "kind": str(f.kind),
                    "local": _fmt(f.local),
                    "remote": _fmt(f.remote),
                }
                for f in self.flows
            ],
            "app": self.app_id,
        }


def _fmt(ep: tuple[str, int] | None) -> str | None:
    if ep is None:
        return None
    host, port = ep[0], ep[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
