"""Raw rtnetlink with pre-encoded address moves, for the freeze window.

A pyroute2 address call costs ~0.75-2 ms; most of it is Python-side message building and
parsing. Inside the freeze window the only work that must happen is the kernel's, so an
`AddressMove` encodes its RTM_NEWADDR / RTM_DELADDR messages once, at construction, and
its `add()` / `delete()` are one `send()` of those bytes plus one `recv()` of the ACK, which is
compared byte for byte with the ACK the kernel is known to produce for it. Only an unexpected
reply (an error, a stale message) is parsed. An IPv6 add also waits until the kernel, which
inserts the address's local route asynchronously, really delivers packets to it (see
LocalRouteEvents); docs/net-fast-path.md has the measurements.

`Rtnl` is one NETLINK_ROUTE socket opened inside a namespace at set-up time and kept open: a
socket keeps its namespace for life, so later calls need no setns(). It is not thread-safe; give
each thread its own.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from sessmob.closing import Closing
from sessmob.netns import socket_in

# <linux/netlink.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1

# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_GETNEIGH = 30
RTNLGRP_IPV6_ROUTE = 11
NETLINK_ADD_MEMBERSHIP = 1
RT_TABLE_LOCAL = 255
RTN_LOCAL = 2
RTA_DST = 1

# <linux/if_link.h>, <linux/if_addr.h>
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_FLAGS = 8
IFA_F_NODAD = 0x02
RT_SCOPE_UNIVERSE = 0

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLMSGERR = struct.Struct("=i")  # error, followed by the request's nlmsghdr
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
NLATTR = struct.Struct("=HH")  # len, type
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")

# classic BPF, <linux/filter.h>
SO_ATTACH_FILTER = 26
BPF_LDB_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS
BPF_LDW_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS (big-endian 32-bit load)
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
SOCK_FILTER = struct.Struct("=HBBI")

RECV_SIZE = 1 << 16


class RtnlError(OSError):
    """An rtnetlink request failed; `errno` is the kernel's, the message says what was asked."""


class AddressError(RtnlError):
    """Adding or removing an address failed (e.g. EEXIST, EADDRNOTAVAIL)."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def nlattr(kind: int, value: bytes) -> bytes:
    """Encode one netlink attribute, padded to 4 bytes."""
    size = NLATTR.size + len(value)
    return NLATTR.pack(size, kind) + value + b"\0" * (_align4(size) - size)


def nlmsg(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    """Encode one netlink message (nlmsg_pid 0: the kernel fills in the sender's port id)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


def parse_attrs(data: bytes | memoryview, offset: int = 0) -> dict[int, bytes]:
    """Decode a run of netlink attributes into {type: value} (nested/dup types: last wins)."""
    attrs: dict[int, bytes] = {}
    end = len(data)
    while offset + NLATTR.size <= end:
        size, kind = NLATTR.unpack_from(data, offset)
        if size < NLATTR.size or offset + size > end:
            break
        attrs[kind & 0x3FFF] = bytes(data[offset + NLATTR.size : offset + size])
        offset += _align4(size)
    return attrs


def _family_of(addr: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(addr)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), ip.packed


def _netlink_socket(netns: str | None) -> socket.socket:
    args = (socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    return socket_in(netns, *args) if netns else socket.socket(*args)


@dataclass(frozen=True)
class Address:
    """One address as RTM_GETADDR reports it."""

    ifindex: int
    addr: str
    prefixlen: int
    flags: int


class Rtnl(Closing):
    """A NETLINK_ROUTE socket living in one network namespace, kept open for fast requests."""

    def __init__(self, sock: socket.socket, netns: str | None) -> None:
        self.sock = sock
        self.netns = netns
        self.where = f"in {netns}" if netns else "in the current netns"
        sock.setblocking(True)  # a timeout would add a poll() per call
        sock.bind((0, 0))
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            sock.setsockopt(SOL_NETLINK, opt, 1)
        self.portid: int = sock.getsockname()[0]
        self._seq = 0
        self._dirty = False  # a request was sent whose reply may still be queued
        self.slow_replies = 0  # replies that missed the byte-compare fast path (diagnostics)

    @classmethod
    def open(cls, netns: str | None) -> Rtnl:
        """Open a socket inside namespace `netns` (None: the calling thread's namespace)."""
        sock = _netlink_socket(netns)
        try:
            return cls(sock, netns)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        """A sequence number not used before on this socket (distinguishes replies)."""
        self._seq = (self._seq % 0xFFFFFFFF) + 1
        return self._seq

    def expected_ack(self, request: bytes) -> bytes:
        """The exact NLMSG_ERROR(0) the kernel sends for `request` on this socket.

        With NETLINK_CAP_ACK the ACK is nlmsghdr(36, NLMSG_ERROR, NLM_F_CAPPED, seq, portid),
        error 0 and the request's own 16-byte header: known in advance, so a byte compare
        replaces parsing on the hot path.
        """
        seq = NLMSGHDR.unpack_from(request)[3]
        body = NLMSGERR.pack(0) + request[: NLMSGHDR.size]
        size = NLMSGHDR.size + len(body)
        return NLMSGHDR.pack(size, NLMSG_ERROR, NLM_F_CAPPED, seq, self.portid) + body

    # -- hot path ---------------------------------------------------------------------------

    def transact(self, request: bytes, ack: bytes, what: str, exc: type[RtnlError]) -> None:
        """Send a pre-encoded request and wait for its ACK: one send(), one recv().

        `ack` is `expected_ack(request)`; any other reply goes to the slow path, which skips
        stale replies (other sequence numbers) and raises `exc` on an NLMSG_ERROR.
        """
        if self._dirty:
            self._drain()
        self._dirty = True
        try:
            self.sock.send(request)
            reply = self.sock.recv(RECV_SIZE)
        except OSError as e:
            raise exc(e.errno, f"{what}: {e.strerror}") from e
        if reply == ack:
            self._dirty = False
            return
        self._slow_ack(reply, request, what, exc)

    # -- slow path --------------------------------------------------------------------------

    def _drain(self) -> None:
        """Discard replies left by an interrupted request.

        rtnetlink handles a request inside send(), so its reply is already queued: a
        non-blocking read until EAGAIN empties everything that belongs to earlier calls.
        """
        while True:
            try:
                self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        self._dirty = False

    def _slow_ack(self, reply: bytes, request: bytes, what: str, exc: type[RtnlError]) -> None:
        self.slow_replies += 1
        seq = NLMSGHDR.unpack_from(request)[3]
        while True:
            for kind, _flags, mseq, body in self._messages(reply):
                if mseq != seq:
                    continue  # stale reply to an earlier request
                if kind == NLMSG_ERROR:
                    self._dirty = False
                    self._raise_if_error(body, what, exc)
                    return
            try:
                reply = self.sock.recv(RECV_SIZE)
            except OSError as e:
                raise exc(e.errno, f"{what}: {e.strerror}") from e

    @staticmethod
    def _messages(data: bytes) -> Iterator[tuple[int, int, int, memoryview]]:
        view = memoryview(data)
        offset = 0
        while offset + NLMSGHDR.size <= len(data):
            size, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
            if size < NLMSGHDR.size or offset + size > len(data):
                break
            yield kind, flags, seq, view[offset + NLMSGHDR.size : offset + size]
            offset += _align4(size)

    @staticmethod
    def _raise_if_error(body: memoryview, what: str, exc: type[RtnlError]) -> None:
        (err,) = NLMSGERR.unpack_from(body)
        if err == 0:
            return
        code = -err
        detail = os.strerror(code)
        # NETLINK_CAP_ACK: only the request header follows; then extack TLVs, if any.
        tlvs = parse_attrs(body, NLMSGERR.size + NLMSGHDR.size)
        msg = tlvs.get(NLMSGERR_ATTR_MSG)
        if msg:
            text = msg.rstrip(b"\0").decode(errors="replace")
            detail += f" ({text})"
        raise exc(code, f"{what}: {detail}")

    def request(
        self, kind: int, flags: int, payload: bytes, what: str, exc: type[RtnlError] = RtnlError
    ) -> list[tuple[int, bytes]]:
        """Set-up-time request: send, collect (type, body) replies until ACK/DONE, raise errors."""
        if self._dirty:
            self._drain()
        seq = self.next_seq()
        self._dirty = True
        try:
            # A dump ends with NLMSG_DONE; anything else is told to end with an ACK.
            ack = 0 if flags & NLM_F_DUMP == NLM_F_DUMP else NLM_F_ACK
            self.sock.send(nlmsg(kind, flags | NLM_F_REQUEST | ack, seq, payload))
        except OSError as e:
            raise exc(e.errno, f"{what}: {e.strerror}") from e
        out: list[tuple[int, bytes]] = []
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError as e:
                raise exc(e.errno, f"{what}: {e.strerror}") from e
            for mkind, _mflags, mseq, body in self._messages(data):
                if mseq != seq:
                    continue
                if mkind == NLMSG_ERROR:
                    self._dirty = False
                    self._raise_if_error(body, what, exc)
                    return out
                if mkind == NLMSG_DONE:
                    self._dirty = False
                    if len(body) >= NLMSGERR.size:
                        self._raise_if_error(body, what, exc)
                    return out
                out.append((mkind, bytes(body)))

    # -- set-up helpers ---------------------------------------------------------------------

    def _getlink(self, ifname: str) -> bytes:
        what = f"RTM_GETLINK {ifname} {self.where}"
        name = nlattr(IFLA_IFNAME, ifname.encode() + b"\0")
        head = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        for kind, body in self.request(RTM_GETLINK, 0, head + name, what):
            if kind == RTM_NEWLINK:
                return body
        raise RtnlError(_errno.ENODEV, f"{what}: no reply")

    def ifindex(self, ifname: str) -> int:
        """Index of interface `ifname` in this socket's namespace (RTM_GETLINK by name)."""
        return int(IFINFOMSG.unpack_from(self._getlink(ifname))[2])

    def link_mac(self, ifname: str) -> str:
        """Hardware address of `ifname` as aa:bb:cc:dd:ee:ff."""
        mac = parse_attrs(self._getlink(ifname), IFINFOMSG.size).get(IFLA_ADDRESS)
        if not mac:
            raise RtnlError(_errno.ENODEV, f"{ifname} {self.where} has no hardware address")
        return mac.hex(":")

    def addresses(self, family: int = socket.AF_UNSPEC) -> list[Address]:
        """All addresses of the namespace (RTM_GETADDR dump)."""
        replies = self.request(
            RTM_GETADDR,
            NLM_F_DUMP,
            IFADDRMSG.pack(family, 0, 0, 0, 0),
            f"RTM_GETADDR dump {self.where}",
        )
        out = []
        for kind, body in replies:
            if kind != RTM_NEWADDR:
                continue
            fam, plen, flags, _scope, index = IFADDRMSG.unpack_from(body)
            attrs = parse_attrs(body, IFADDRMSG.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None:
                continue
            if IFA_FLAGS in attrs:
                flags = struct.unpack("=I", attrs[IFA_FLAGS])[0]
            out.append(Address(index, socket.inet_ntop(fam, raw), plen, flags))
        return out

    def is_local(self, addr: str) -> bool:
        """Whether the kernel would deliver a packet for `addr` locally (RTM_GETROUTE)."""
        family, packed = _family_of(addr)
        payload = RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0) + nlattr(RTA_DST, packed)
        try:
            replies = self.request(RTM_GETROUTE, 0, payload, f"RTM_GETROUTE {addr} {self.where}")
        except RtnlError as e:
            if e.errno in (_errno.ENETUNREACH, _errno.EHOSTUNREACH):
                return False
            raise
        return any(k == RTM_NEWROUTE and RTMSG.unpack_from(b)[7] == RTN_LOCAL for k, b in replies)

    def has_address(self, addr: str, ifindex: int | None = None) -> bool:
        """Whether `addr` is configured in this namespace (on `ifindex`, if given)."""
        family, _ = _family_of(addr)
        want = ipaddress.ip_address(addr)
        return any(
            ipaddress.ip_address(a.addr) == want and (ifindex is None or a.ifindex == ifindex)
            for a in self.addresses(family)
        )


def local_route_filter(packed: bytes) -> bytes:
    """cBPF program passing only RTM_NEWROUTE of the IPv6 local route for address `packed`.

    Checks nlmsghdr + rtmsg fields (type, family, /128, table local, RTN_LOCAL) with byte
    loads, so host endianness never matters, and the address in RTA_DST. The kernel
    (rt6_fill_node) puts RTA_TABLE first and RTA_DST right after it, so the attribute header
    sits at offset 36 and the address at 40; the header is checked too, so a different layout
    can only make the filter reject, which add() reports as a timeout rather than trusting it.
    Filtering on the address keeps other addresses' routes from piling up on the socket.
    """
    rta_dst = NLATTR.pack(NLATTR.size + 16, RTA_DST)
    checks = [(BPF_LDB_ABS, 4, RTM_NEWROUTE), (BPF_LDB_ABS, 5, 0),
              (BPF_LDB_ABS, 16, socket.AF_INET6), (BPF_LDB_ABS, 17, 128),
              (BPF_LDB_ABS, 20, RT_TABLE_LOCAL), (BPF_LDB_ABS, 23, RTN_LOCAL)]  # fmt: skip
    checks += [(BPF_LDB_ABS, 36 + i, rta_dst[i]) for i in range(4)]
    checks += [
        (BPF_LDW_ABS, 40 + i, int.from_bytes(packed[i : i + 4], "big")) for i in (0, 4, 8, 12)
    ]
    prog = b""
    for i, (load, offset, value) in enumerate(checks):
        prog += SOCK_FILTER.pack(load, 0, 0, offset)
        reject = 2 * (len(checks) - i - 1) + 1  # jump over the remaining checks and the accept
        prog += SOCK_FILTER.pack(BPF_JEQ_K, 0, reject, value)
    prog += SOCK_FILTER.pack(BPF_RET_K, 0, 0, 0xFFFFFFFF)
    prog += SOCK_FILTER.pack(BPF_RET_K, 0, 0, 0)
    return prog


class LocalRouteEvents:
    """Notifications of the local route of one IPv6 address in one namespace.

    Why: the kernel ACKs an IPv6 RTM_NEWADDR before the address can receive anything. Even with
    IFA_F_NODAD, the address's local route is inserted later by the addrconf workqueue
    (measured here: missing right after the ACK in ~3% of adds, for up to ~4.5 ms); packets
    arriving in between are dropped. The route's RTM_NEWROUTE notification is the exact moment
    the address becomes usable. The socket is filtered in the kernel so that only such routes
    are queued on it; SO_RCVTIMEO bounds the wait without a poll() per call.
    """

    def __init__(self, netns: str | None, addr: str, timeout: float) -> None:
        self.timeout = timeout
        packed = ipaddress.IPv6Address(addr).packed
        sock = _netlink_socket(netns)
        try:
            sock.setblocking(True)
            sock.bind((0, 0))
            prog = local_route_filter(packed)
            buf = ctypes.create_string_buffer(prog, len(prog))
            fprog = struct.pack("@HP", len(prog) // SOCK_FILTER.size, ctypes.addressof(buf))
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            sec = int(timeout)
            tv = struct.pack("@ll", sec, int((timeout - sec) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_IPV6_ROUTE)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def drain(self) -> None:
        """Drop queued notifications (left by an interrupted add or another program's add)."""
        while True:
            try:
                self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: overrun, already reset by the kernel
                if e.errno != _errno.ENOBUFS:
                    raise

    def wait_for(self, packed: bytes) -> None:
        """Block until the local route of `packed` (an IPv6 address) has been inserted.

        Raises BlockingIOError after `timeout`, OSError(ENOBUFS) if notifications were lost.
        """
        recv = self.sock.recv
        while packed not in recv(RECV_SIZE):
            pass  # not ours (the kernel filter makes this unreachable; kept as a guard)

    def close(self) -> None:
        self.sock.close()


class AddressMove(Closing):
    """One address on one interface of one namespace, with its add/delete messages pre-encoded.

    RTM_NEWADDR carries IFA_LOCAL and IFA_ADDRESS (equal: not a point-to-point peer), IFA_FLAGS
    and, for IPv6, IFA_F_NODAD so the address is usable at once instead of tentative for the
    DAD period; for IPv4 with a prefix shorter than /31 also the natural IFA_BROADCAST.
    NLM_F_CREATE|NLM_F_EXCL makes a duplicate add fail with EEXIST instead of silently
    succeeding, so a caller never believes it took an address someone else holds.

    For IPv6, `add()` also waits (by default) until the kernel has inserted the address's local
    route, so that the address really receives packets when it returns: it reads the route's
    RTM_NEWROUTE notification (see LocalRouteEvents), then sends a no-op RTM_SETLINK whose ACK
    can only come once the addrconf work that inserts the route has released the RTNL lock.
    `add(wait=False)` + `wait_usable()` split this so other work (restoring sockets) can
    overlap the kernel's. The wait needs a second netlink socket, opened here unless
    `watch_route` is False. IPv4 adds are complete at the ACK.
    """

    def __init__(
        self,
        rtnl: Rtnl,
        ifindex: int,
        addr: str,
        prefixlen: int,
        *,
        watch_route: bool = True,
        route_timeout: float = 1.0,
    ) -> None:
        family, packed = _family_of(addr)
        maxlen = 128 if family == socket.AF_INET6 else 32
        if not 0 <= prefixlen <= maxlen:
            raise ValueError(f"prefix length {prefixlen} out of range for {addr}")
        self.rtnl = rtnl
        self.ifindex = ifindex
        self.addr = addr
        self.prefixlen = prefixlen
        flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
        attrs = nlattr(IFA_LOCAL, packed) + nlattr(IFA_ADDRESS, packed)
        if family == socket.AF_INET and prefixlen < 31:
            net = ipaddress.IPv4Network(f"{addr}/{prefixlen}", strict=False)
            attrs += nlattr(IFA_BROADCAST, net.broadcast_address.packed)
        head = IFADDRMSG.pack(family, prefixlen, flags & 0xFF, RT_SCOPE_UNIVERSE, ifindex)
        self.add_msg = nlmsg(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            rtnl.next_seq(),
            head + attrs + nlattr(IFA_FLAGS, struct.pack("=I", flags)),
        )
        self.del_msg = nlmsg(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            rtnl.next_seq(),
            IFADDRMSG.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, ifindex)
            + nlattr(IFA_LOCAL, packed)
            + nlattr(IFA_ADDRESS, packed),
        )
        self._add_ack = rtnl.expected_ack(self.add_msg)
        self._del_ack = rtnl.expected_ack(self.del_msg)
        target = f"{addr}/{prefixlen} on ifindex {ifindex} {rtnl.where}"
        self._add_what = f"RTM_NEWADDR {target}"
        self._del_what = f"RTM_DELADDR {target}"
        self._packed = packed
        self.events: LocalRouteEvents | None = None
        if family == socket.AF_INET6 and watch_route:
            self.events = LocalRouteEvents(rtnl.netns, addr, route_timeout)
        # No attributes, no flags to change: RTM_SETLINK only takes and releases the RTNL lock.
        self.barrier_msg = nlmsg(
            RTM_SETLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            rtnl.next_seq(),
            IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0),
        )
        self._barrier_ack = rtnl.expected_ack(self.barrier_msg)
        self._barrier_what = f"RTM_SETLINK (RTNL barrier) ifindex {ifindex} {rtnl.where}"

    def add(self, wait: bool = True) -> None:
        """Configure the address; AddressError, e.g. EEXIST, on failure.

        IPv4: one send + one recv, and the address is usable. IPv6 with a route watch: a
        non-blocking recv first (drops stale notifications), then send + recv; with `wait`
        also `wait_usable()`, so that the address receives packets when add() returns.
        """
        events = self.events
        if events is not None:
            # A queued notification can only be stale (an interrupted add, a second
            # AddressMove or another program adding this address): drop it before sending.
            events.drain()
        self.rtnl.transact(self.add_msg, self._add_ack, self._add_what, AddressError)
        if wait and events is not None:
            self.wait_usable()

    def wait_usable(self) -> None:
        """After `add(wait=False)`: return once the address receives packets (IPv6).

        One recv (the local route's notification, often already queued) and one send + recv
        (the RTNL barrier). A no-op for IPv4 and without a route watch. Without a preceding
        add it times out (AddressError ETIMEDOUT after `route_timeout`).
        """
        events = self.events
        if events is None:
            return
        try:
            events.wait_for(self._packed)
        except OSError as e:
            self._route_wait_failed(e)
        self.rtnl.transact(self.barrier_msg, self._barrier_ack, self._barrier_what, AddressError)

    def _route_wait_failed(self, e: OSError) -> None:
        events = self.events
        assert events is not None
        if isinstance(e, BlockingIOError):
            raise AddressError(
                _errno.ETIMEDOUT,
                f"{self._add_what}: added, but its local route did not appear within "
                f"{events.timeout} s (interface down?); it does not receive packets yet",
            ) from e
        if e.errno != _errno.ENOBUFS:
            raise AddressError(
                e.errno or 0, f"{self._add_what}: waiting for the local route: {e.strerror}"
            ) from e
        # Notifications were lost (socket overrun): ours may or may not be among them. Once
        # the RTNL lock has been held and released, a route that was being inserted is in.
        events.drain()
        self.rtnl.transact(self.barrier_msg, self._barrier_ack, self._barrier_what, AddressError)
        if not self.rtnl.is_local(self.addr):
            try:  # the addrconf work has not run yet: its notification is still to come
                events.wait_for(self._packed)
            except OSError as again:
                raise AddressError(
                    again.errno or 0, f"{self._add_what}: waiting for the local route"
                ) from again

    def delete(self) -> None:
        """Remove the address (one send + one recv); AddressError, e.g. EADDRNOTAVAIL."""
        self.rtnl.transact(self.del_msg, self._del_ack, self._del_what, AddressError)

    def close(self) -> None:
        """Close the IPv6 route-notification socket (the Rtnl is the caller's)."""
        if self.events is not None:
            self.events.close()

    def __repr__(self) -> str:
        where = self.rtnl.where
        return f"AddressMove({self.addr}/{self.prefixlen}, ifindex={self.ifindex}, {where})"
