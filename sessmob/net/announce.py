"""Prebuilt address announcements: unsolicited Neighbor Advertisement / gratuitous ARP.

After an address moves, every host on the link still maps it to the old device's MAC until
its neighbour entry times out (seconds). One unsolicited NA with the Override flag (IPv6,
RFC 4861 7.2.6) or one gratuitous ARP (IPv4, RFC 5227 3) makes them switch at once. The frame
depends only on the address and the interface MAC, both known long before the freeze, so it is
built here with plain `struct` (no scapy: importing it takes longer than a whole migration)
on an AF_PACKET socket opened in the right namespace; `send()` is one send() syscall.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from sessmob.closing import Closing
from sessmob.net.inet import checksum
from sessmob.netns import socket_in

ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
IPPROTO_ICMPV6 = 58
ND_NEIGHBOR_ADVERT = 136
ND_OPT_TARGET_LLADDR = 2
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
ALL_NODES_MAC = bytes.fromhex("333300000001")
BROADCAST_MAC = b"\xff" * 6
ETH_ZLEN = 60  # minimum Ethernet frame without FCS; short frames are padded to it


class AnnounceError(OSError):
    """Opening the packet socket or sending the announcement failed."""


def build_na(mac: bytes, addr: str) -> bytes:
    """Ethernet frame: unsolicited NA for `addr` from `addr` to ff02::1, Override set.

    Solicited must be clear (a multicast NA with S set is dropped, RFC 4861 7.1.2); Router is
    clear because a host takes the address; hop limit 255 proves it was not forwarded.
    """
    src = ipaddress.IPv6Address(addr).packed
    option = struct.pack("!BB6s", ND_OPT_TARGET_LLADDR, 1, mac)
    body = struct.pack("!I16s", NA_FLAG_OVERRIDE, src) + option
    length = 4 + len(body)  # type, code, checksum
    pseudo = src + ALL_NODES + struct.pack("!I3xB", length, IPPROTO_ICMPV6)
    icmp0 = struct.pack("!BBH", ND_NEIGHBOR_ADVERT, 0, 0) + body
    icmp = struct.pack("!BBH", ND_NEIGHBOR_ADVERT, 0, checksum(pseudo + icmp0)) + body
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, length, IPPROTO_ICMPV6, 255, src, ALL_NODES)
    return struct.pack("!6s6sH", ALL_NODES_MAC, mac, ETH_P_IPV6) + ip6 + icmp


def build_garp(mac: bytes, addr: str) -> bytes:
    """Ethernet frame: broadcast ARP request with sender IP = target IP = `addr`.

    A request rather than a reply: Linux treats it as gratuitous (sip == tip) and overrides
    existing entries whatever the locktime, and hosts that ignore unsolicited replies still
    process requests.
    """
    ip = ipaddress.IPv4Address(addr).packed
    arp = struct.pack(
        "!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST, mac, ip, b"\0" * 6, ip
    )
    frame = struct.pack("!6s6sH", BROADCAST_MAC, mac, ETH_P_ARP) + arp
    return frame + b"\0" * (ETH_ZLEN - len(frame))


class Announcer(Closing):
    """One prebuilt NA (IPv6) or gratuitous ARP (IPv4) frame on an open packet socket.

    Built while `addr` need not yet be configured; `send()` just puts the frame on the wire of
    `ifname` in namespace `netns`. The interface MAC is read once here: rebuild the Announcer
    if the MAC changes.
    """

    def __init__(self, netns: str | None, ifname: str, addr: str) -> None:
        self.netns = netns
        self.ifname = ifname
        self.addr = addr
        where = f"{ifname} in {netns}" if netns else f"{ifname} in the current netns"
        self._what = f"announce {addr} on {where}"
        version = ipaddress.ip_address(addr).version
        args = (socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: send only, never receives
        try:
            sock = socket_in(netns, *args) if netns else socket.socket(*args)
        except OSError as e:
            raise AnnounceError(e.errno, f"{self._what}: packet socket: {e.strerror}") from e
        try:
            sock.setblocking(True)
            sock.bind((ifname, 0))
            _name, _proto, _pkttype, hatype, mac = sock.getsockname()
            if hatype != ARPHRD_ETHER or len(mac) != 6:
                raise AnnounceError(errno.EINVAL, f"{self._what}: not an Ethernet interface")
        except OSError as e:
            sock.close()
            if isinstance(e, AnnounceError):
                raise
            raise AnnounceError(e.errno, f"{self._what}: bind: {e.strerror}") from e
        self.sock = sock
        self.mac: str = mac.hex(":")
        self.frame: bytes = build_na(mac, addr) if version == 6 else build_garp(mac, addr)

    def send(self) -> None:
        """Send the prebuilt frame: one send() syscall."""
        try:
            self.sock.send(self.frame)
        except OSError as e:
            raise AnnounceError(e.errno, f"{self._what}: {e.strerror}") from e

    def close(self) -> None:
        self.sock.close()
