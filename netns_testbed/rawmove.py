"""The raw move: one TCP connection and its address from one device to another.

Uses only the native TCP repair helper and pre-built netlink/announcement messages — no
Relocation Manager — so its timings are the floor the RM is measured against.

Order (the one that keeps a failed move recoverable, see docs/architecture.md):

    isolate    remove the session address on the source device: arriving segments are
               dropped from now on (nothing is ACKed after the dump), and the output guard
               installed at set-up (sessmob.net.isolation) keeps the frozen socket from
               sending anything more                                      <- t_Mig starts
    freeze     TCP_REPAIR on
    dump       read the whole connection state
    addr_add   add the address on the destination device (nodad); the kernel finishes the
               IPv6 local route asynchronously while the socket is restored
    restore    rebuild the socket there (repair mode)                     <- freeze→restored
    activate   repair off, an ACK telling the peer the real window, never-sent bytes go out
    addr_ready wait until the address really receives (IPv6 local route in place), so
               nothing the peer sends after the announcement is dropped
    announce   unsolicited NA / gratuitous ARP from the destination       <- t_Mig ends
    release    close the frozen source socket silently (after the commit point)

Any failure before `activate` succeeds undoes what was done: the destination socket is
dropped silently, the address goes back, the source socket resumes. Nothing is lost: the peer
retransmits whatever it sent into the isolation.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field

from sessmob import netns, tcp_repair
from sessmob.closing import Closing
from sessmob.net import neigh
from sessmob.net.announce import Announcer
from sessmob.net.isolation import install_output_guard
from sessmob.net.rtnl import AddressMove, Rtnl
from sessmob.tcp_snapshot import TCP_ESTABLISHED, TcpSnapshot

from .topology import Testbed

PHASES = ("isolate", "freeze", "dump", "addr_add", "restore", "activate", "addr_ready", "announce")
_COMMIT = PHASES.index("activate") + 1  # phases before this index roll back on failure


class MoveFailed(RuntimeError):
    """A move failed and was rolled back: the connection runs on the source device again."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"move failed at {step}: {cause}; rolled back to the source device")


@dataclass
class MoveTiming:
    """Durations of one move, in seconds, by phase (PHASES order) plus the totals."""

    phases: dict[str, float] = field(default_factory=dict)
    t_mig: float = 0.0  # start of isolation -> announcement sent
    freeze_to_restored: float = 0.0  # start of freeze -> restored socket exists
    release: float = 0.0  # after the commit point, outside t_Mig
    queued_bytes: int = 0  # receive + send queue moved
    post_commit_errors: list[str] = field(default_factory=list)  # moved, but e.g. no NA sent


@dataclass
class _Device:
    name: str
    ns_fd: int
    rtnl: Rtnl
    addr: AddressMove
    announcer: Announcer
    acks: tcp_repair.AckSender


class RawMover(Closing):
    """Moves the session address and one connection on it between `ed` and `id` of a lan.

    Everything a move needs (netlink sockets, encoded messages, namespace fds, announcement
    frames) is opened here, ahead of time; move() itself only makes syscalls.
    """

    def __init__(self, tb: Testbed, family: int, devices: tuple[str, ...] = ("ed", "id")) -> None:
        self.tb = tb
        self.family = family
        if family == socket.AF_INET6:
            self.addr, plen = tb.session_addr6, tb.session_prefixlen6
            self.cn_addr = tb.hosts["cn"].addr6
        else:
            self.addr, plen = tb.session_addr4, tb.session_prefixlen4
            self.cn_addr = tb.hosts["cn"].addr4
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.devices: dict[str, _Device] = {}
        try:
            for name in devices:
                host = tb.hosts[name]
                install_output_guard(host.netns, [self.addr])
                rtnl = Rtnl.open(host.netns)
                with netns.entered(host.netns):
                    acks = tcp_repair.AckSender()
                self.devices[name] = _Device(
                    name=name,
                    ns_fd=netns.open_netns(host.netns),
                    rtnl=rtnl,
                    addr=AddressMove(rtnl, host.ifindex, self.addr, plen),
                    announcer=Announcer(host.netns, host.ifname, self.addr),
                    acks=acks,
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for dev in self.devices.values():
            dev.acks.close()
            dev.addr.close()
            dev.announcer.close()
            dev.rtnl.close()
            os.close(dev.ns_fd)
        self.devices.clear()
        if self._home >= 0:
            os.close(self._home)
            self._home = -1

    def place(self, device: str) -> None:
        """Put the session address on `device` (set-up, not a move) and announce it, so that
        neighbours still holding another device's MAC for it (from earlier moves) update."""
        dev = self.devices[device]
        dev.addr.add()
        dev.announcer.send()

    def prepare(self, dst: str) -> None:
        """Work that belongs before the freeze: the destination knows the CN's MAC."""
        host = self.tb.hosts[dst]
        neigh.resolve(host.netns, host.ifname, self.cn_addr)

    def move(
        self,
        sock: socket.socket,
        src: str,
        dst: str,
        *,
        fail_at: str | None = None,
        via_bytes: bool = False,
    ) -> tuple[socket.socket, MoveTiming]:
        """Move one connection; see move_many()."""
        new, timing = self.move_many([sock], src, dst, fail_at=fail_at, via_bytes=via_bytes)
        return new[0], timing

    def move_many(
        self,
        socks: list[socket.socket],
        src: str,
        dst: str,
        *,
        fail_at: str | None = None,
        via_bytes: bool = False,
    ) -> tuple[list[socket.socket], MoveTiming]:
        """Move connections on the session address from `src` to `dst`, all in one go.

        Returns the new sockets (active, in dst's namespace, in the same order) and the
        timings. On failure raises MoveFailed after rolling back; `fail_at` names a phase at
        which to fail on purpose (fault injection for tests of the rollback path).
        `via_bytes` sends the snapshots through their byte form, as a transfer would.
        """
        if fail_at is not None and fail_at not in PHASES[:_COMMIT]:
            raise ValueError(f"fail_at must name a phase up to 'activate', not {fail_at!r}")
        s, d = self.devices[src], self.devices[dst]
        clock = time.perf_counter
        done: list[str] = []
        new: list[socket.socket] = []
        snaps: list[TcpSnapshot] = []
        addr_ready = False
        errors: list[str] = []
        marks = [clock()]
        step = PHASES[0]
        try:
            for step in PHASES[:_COMMIT]:
                if step == fail_at:
                    raise RuntimeError(f"injected failure at {step}")
                if step == "isolate":
                    s.addr.delete()
                elif step == "freeze":
                    tcp_repair.freeze_many(socks)  # type: ignore[arg-type]
                elif step == "dump":
                    snaps = tcp_repair.dump_many(socks)  # type: ignore[arg-type]
                    if via_bytes:
                        snaps = [TcpSnapshot.from_bytes(x.to_bytes()) for x in snaps]
                elif step == "addr_add":
                    d.addr.add(wait=False)
                elif step == "restore":
                    netns.setns(d.ns_fd)
                    try:
                        new = tcp_repair.restore_many(snaps)
                    except tcp_repair.BatchError as e:
                        new = [r for r in e.results if isinstance(r, socket.socket)]
                        raise
                    finally:
                        netns.setns(self._home)
                elif step == "activate":
                    if any(x.tcp_state != TCP_ESTABLISHED for x in snaps):
                        # A peer's FIN is injected into the local stack: the address must
                        # already receive here.
                        d.addr.wait_usable()
                        addr_ready = True
                    self._activate(new, d, errors)
                done.append(step)
                marks.append(clock())
        except BaseException as e:
            self._rollback(socks, new, done, s, d)
            raise MoveFailed(step, e) from e
        # Past the commit point the destination owns the connections: a failure here costs
        # the peer a retransmission or a neighbour probe, never a connection.
        for step in PHASES[_COMMIT:]:
            try:
                if step == "addr_ready" and not addr_ready:
                    d.addr.wait_usable()
                elif step == "announce":
                    d.announcer.send()
            except OSError as e:
                errors.append(f"{step}: {e}")
            marks.append(clock())
        t_release = clock()
        try:
            tcp_repair.release_many(socks)  # type: ignore[arg-type]
        except tcp_repair.BatchError as e:  # the moved connections live on regardless
            errors.extend(f"release flow {i}: {err}" for i, err in e.errors.items())
        return new, MoveTiming(
            phases={p: marks[i + 1] - marks[i] for i, p in enumerate(PHASES)},
            t_mig=marks[-1] - marks[0],
            freeze_to_restored=marks[PHASES.index("restore") + 1] - marks[1],
            release=clock() - t_release,
            queued_bytes=sum(x.inq_len + x.outq_len for x in snaps),
            post_commit_errors=errors,
        )

    @staticmethod
    def _activate(new: list[socket.socket], d: _Device, errors: list[str]) -> None:
        """Activate every restored socket in one call. This is the commit point: if none
        became active, everything rolls back; if only some failed, those are recorded (a
        flow lost — never seen: leaving repair mode does not fail on a socket that was just
        restored) and the rest goes on."""
        try:
            tcp_repair.activate_many(new, d.acks)  # type: ignore[arg-type]
        except tcp_repair.BatchError as e:
            if len(e.errors) == len(new):
                raise
            errors.extend(f"activate flow {i}: {err}" for i, err in e.errors.items())

    def _rollback(
        self,
        socks: list[socket.socket],
        new: list[socket.socket],
        done: list[str],
        s: _Device,
        d: _Device,
    ) -> None:
        """Undo the steps in `done`, newest first, leaving the connections on the source."""
        if new:
            tcp_repair.release_many(new)  # type: ignore[arg-type]
        if "addr_add" in done:
            d.addr.delete()
        if "isolate" in done:
            s.addr.add()
            # The freeze was attempted: resume every socket (a partial freeze_many leaves
            # some frozen; leaving repair mode on an unfrozen one only sends a probe).
            for sock in socks:
                with contextlib.suppress(tcp_repair.TcpRepairError):
                    tcp_repair.resume(sock)
