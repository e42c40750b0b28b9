"""Building IP packets by hand, for IPPROTO_RAW sockets (header included).

Used for injecting what a peer had sent into the local stack (queued UDP datagrams after a
move) and for prebuilding announcement frames; the TCP segments of the native helper are
built in C.
"""

from __future__ import annotations

import socket
import struct


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def is_v4(addr: str) -> bool:
    """IPv4, also when written as an IPv4-mapped IPv6 address."""
    return ":" not in addr or addr.startswith("::ffff:")


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """A complete IPv4 or IPv6 packet carrying one UDP datagram (for an IPPROTO_RAW socket)."""
    v4 = is_v4(dst[0])
    fam = socket.AF_INET if v4 else socket.AF_INET6
    s = socket.inet_pton(fam, src[0].removeprefix("::ffff:") if v4 else src[0])
    d = socket.inet_pton(fam, dst[0].removeprefix("::ffff:") if v4 else dst[0])
    length = 8 + len(payload)
    pseudo = (
        s + d + (struct.pack("!BBH", 0, 17, length) if v4 else struct.pack("!IxxxB", length, 17))
    )
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + payload
    c = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    if v4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, 17, 0, s, d)
        return ip + udp
    return struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, s, d) + udp
