"""Byte-level checks of sessmob.net's pre-encoded messages and frames (no privileges needed).

Netlink messages are compared with pyroute2's encoding of the same message and decoded back
with it; NA / ARP frames are decoded field by field with scapy and their checksum recomputed.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from sessmob.net import neigh
from sessmob.net.announce import build_garp, build_na
from sessmob.net.rtnl import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RTM_DELADDR,
    RTM_NEWADDR,
    AddressError,
    AddressMove,
    Rtnl,
    local_route_filter,
    nlattr,
)

MAC = bytes.fromhex("02005e0000a1")
MAC_TEXT = "02:00:5e:00:00:a1"


def pyroute2_addr(
    kind: int,
    flags: int,
    seq: int,
    family: int,
    plen: int,
    ifa_flags: int,
    index: int,
    attrs: list[list[object]],
) -> bytes:
    msg = ifaddrmsg()
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg["family"] = family
    msg["prefixlen"] = plen
    msg["flags"] = ifa_flags
    msg["scope"] = 0
    msg["index"] = index
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def decode_addr(data: bytes) -> ifaddrmsg:
    msg = ifaddrmsg(data)
    msg.decode()
    return msg


class FakeSock:
    """Stands in for the netlink socket: records sends, plays back queued replies."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.replies: list[bytes | BaseException] = []

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.replies:
            if flags & socket.MSG_DONTWAIT:
                raise BlockingIOError(errno.EAGAIN, "empty")
            raise AssertionError("blocking recv with nothing queued")
        item = self.replies.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        pass


def use_fake(rtnl: Rtnl) -> FakeSock:
    """Swap the Rtnl's real socket for a FakeSock."""
    rtnl.sock.close()
    fake = FakeSock()
    rtnl.sock = fake  # type: ignore[assignment]
    return fake


def fake_events(move: AddressMove) -> FakeSock:
    """Swap the move's route-notification socket for a FakeSock."""
    assert move.events is not None
    move.events.sock.close()
    fake = FakeSock()
    move.events.sock = fake  # type: ignore[assignment]
    return fake


@pytest.fixture
def rtnl() -> Iterator[Rtnl]:
    # An unprivileged NETLINK_ROUTE socket in the current namespace; nothing is sent on it.
    with Rtnl.open(None) as r:
        yield r


def nl_error(seq: int, portid: int, err: int, request: bytes, msg: bytes = b"") -> bytes:
    flags = 0x100  # NLM_F_CAPPED
    tlv = b""
    if msg:
        flags |= 0x200  # NLM_F_ACK_TLVS
        tlv = nlattr(1, msg + b"\0")
    body = struct.pack("=i", err) + request[:16] + tlv
    return struct.pack("=IHHII", 16 + len(body), NLMSG_ERROR, flags, seq, portid) + body


# -- RTM_NEWADDR / RTM_DELADDR ----------------------------------------------------------------


def test_ipv6_newaddr_matches_pyroute2(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64, watch_route=False)
    seq = struct.unpack_from("=I", move.add_msg, 8)[0]
    ref = pyroute2_addr(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        socket.AF_INET6,
        64,
        0x02,
        7,
        [["IFA_LOCAL", "2001:db8:1::100"], ["IFA_ADDRESS", "2001:db8:1::100"], ["IFA_FLAGS", 0x02]],
    )
    assert move.add_msg == ref
    msg = decode_addr(move.add_msg)
    assert msg["family"] == socket.AF_INET6
    assert msg["prefixlen"] == 64
    assert msg["flags"] == 0x02  # IFA_F_NODAD: usable at once, no tentative phase
    assert msg["index"] == 7
    assert msg.get_attr("IFA_LOCAL") == msg.get_attr("IFA_ADDRESS") == "2001:db8:1::100"
    assert msg.get_attr("IFA_FLAGS") == 0x02
    assert msg.get_attr("IFA_BROADCAST") is None


def test_ipv6_deladdr_matches_pyroute2(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64, watch_route=False)
    seq = struct.unpack_from("=I", move.del_msg, 8)[0]
    ref = pyroute2_addr(
        RTM_DELADDR,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        socket.AF_INET6,
        64,
        0,
        7,
        [["IFA_LOCAL", "2001:db8:1::100"], ["IFA_ADDRESS", "2001:db8:1::100"]],
    )
    assert move.del_msg == ref


def test_ipv4_newaddr_has_natural_broadcast(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 3, "192.0.2.100", 24)
    seq = struct.unpack_from("=I", move.add_msg, 8)[0]
    ref = pyroute2_addr(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        socket.AF_INET,
        24,
        0,
        3,
        [
            ["IFA_LOCAL", "192.0.2.100"],
            ["IFA_ADDRESS", "192.0.2.100"],
            ["IFA_BROADCAST", "192.0.2.255"],
            ["IFA_FLAGS", 0],
        ],
    )
    assert move.add_msg == ref
    assert decode_addr(move.add_msg).get_attr("IFA_BROADCAST") == "192.0.2.255"


@pytest.mark.parametrize("plen", [31, 32])
def test_ipv4_point_to_point_prefixes_have_no_broadcast(rtnl: Rtnl, plen: int) -> None:
    move = AddressMove(rtnl, 3, "192.0.2.100", plen)
    assert decode_addr(move.add_msg).get_attr("IFA_BROADCAST") is None


def test_ipv4_deladdr_matches_pyroute2(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 3, "198.51.100.7", 24)
    seq = struct.unpack_from("=I", move.del_msg, 8)[0]
    ref = pyroute2_addr(
        RTM_DELADDR,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        socket.AF_INET,
        24,
        0,
        3,
        [["IFA_LOCAL", "198.51.100.7"], ["IFA_ADDRESS", "198.51.100.7"]],
    )
    assert move.del_msg == ref


def test_bad_prefix_length_is_refused(rtnl: Rtnl) -> None:
    with pytest.raises(ValueError, match="prefix length"):
        AddressMove(rtnl, 3, "192.0.2.1", 33)


def test_every_message_gets_its_own_sequence_number(rtnl: Rtnl) -> None:
    moves = [AddressMove(rtnl, 1, f"2001:db8::{i}", 64, watch_route=False) for i in range(1, 4)]
    seqs = [struct.unpack_from("=I", m.add_msg, 8)[0] for m in moves]
    seqs += [struct.unpack_from("=I", m.del_msg, 8)[0] for m in moves]
    assert len(set(seqs)) == len(seqs)


def test_expected_ack_layout(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64, watch_route=False)
    ack = rtnl.expected_ack(move.add_msg)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", ack)
    assert (length, kind, flags) == (len(ack), NLMSG_ERROR, 0x100)
    assert seq == struct.unpack_from("=I", move.add_msg, 8)[0]
    assert pid == rtnl.portid
    assert struct.unpack_from("=i", ack, 16) == (0,)
    assert ack[20:] == move.add_msg[:16]


# -- reply handling (fake socket) --------------------------------------------------------------


def test_ack_fast_path_and_error_carries_errno_and_target(rtnl: Rtnl) -> None:
    fake = use_fake(rtnl)
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64, watch_route=False)
    fake.replies.append(rtnl.expected_ack(move.add_msg))
    move.add()
    assert fake.sent == [move.add_msg]
    assert rtnl.slow_replies == 0

    seq = struct.unpack_from("=I", move.add_msg, 8)[0]
    fake.replies.append(nl_error(seq, rtnl.portid, -errno.EEXIST, move.add_msg, b"boom"))
    with pytest.raises(AddressError) as info:
        move.add()
    assert info.value.errno == errno.EEXIST
    assert "RTM_NEWADDR 2001:db8:1::100/64 on ifindex 7" in str(info.value)
    assert "File exists" in str(info.value) and "boom" in str(info.value)


def test_stale_reply_is_never_taken_for_the_current_one(rtnl: Rtnl) -> None:
    fake = use_fake(rtnl)
    move = AddressMove(rtnl, 7, "192.0.2.100", 24)
    add_seq = struct.unpack_from("=I", move.add_msg, 8)[0]
    # The delete's reply is preceded by a stale error for an earlier add: skipped by seq.
    fake.replies += [
        nl_error(add_seq, rtnl.portid, -errno.EEXIST, move.add_msg),
        rtnl.expected_ack(move.del_msg),
    ]
    move.delete()
    assert rtnl.slow_replies == 1
    assert not fake.replies


def test_interrupted_call_leaves_nothing_for_the_next(rtnl: Rtnl) -> None:
    fake = use_fake(rtnl)
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64, watch_route=False)
    seq = struct.unpack_from("=I", move.add_msg, 8)[0]
    fake.replies.append(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        move.add()
    # The interrupted add's error reply (same seq as the next add!) is still queued; the next
    # call drains it before sending, so it reads its own ACK.
    fake.replies += [nl_error(seq, rtnl.portid, -errno.EEXIST, move.add_msg)]
    original_send = fake.send

    def send_then_ack(data: bytes) -> int:
        fake.replies.append(rtnl.expected_ack(move.add_msg))
        return original_send(data)

    fake.send = send_then_ack  # type: ignore[method-assign]
    move.add()
    assert not fake.replies


# -- neighbour lookups --------------------------------------------------------------------------


def test_getneigh_request_and_reply_decoding(rtnl: Rtnl) -> None:
    fake = use_fake(rtnl)
    reply = ndmsg()
    reply["header"]["type"] = 28  # RTM_NEWNEIGH
    reply["header"]["flags"] = 0
    reply["header"]["pid"] = rtnl.portid
    reply["family"] = socket.AF_INET6
    reply["ifindex"] = 5
    reply["state"] = neigh.NUD_STALE
    reply["flags"] = 0
    reply["ndm_type"] = 1
    reply["attrs"] = [["NDA_DST", "2001:db8:1::3"], ["NDA_LLADDR", MAC_TEXT]]

    def answer(data: bytes) -> int:
        seq = struct.unpack_from("=I", data, 8)[0]
        reply["header"]["sequence_number"] = seq
        reply.encode()
        fake.replies += [bytes(reply.data), nl_error(seq, rtnl.portid, 0, data)]
        fake.sent.append(bytes(data))
        return len(data)

    fake.send = answer  # type: ignore[method-assign]
    entry = neigh.lookup(rtnl, 5, "2001:db8:1::3")
    assert entry == neigh.Neighbour("2001:db8:1::3", 5, neigh.NUD_STALE, MAC_TEXT)
    assert entry is not None and entry.usable

    sent = ndmsg(fake.sent[0])
    sent.decode()
    assert sent["header"]["type"] == 30  # RTM_GETNEIGH, a get (no dump flag)
    assert sent["family"] == socket.AF_INET6 and sent["ifindex"] == 5
    assert sent["state"] == 0 and sent.get_attr("NDA_DST") == "2001:db8:1::3"


def test_getneigh_enoent_means_no_entry(rtnl: Rtnl) -> None:
    fake = use_fake(rtnl)

    def answer(data: bytes) -> int:
        seq = struct.unpack_from("=I", data, 8)[0]
        fake.replies.append(nl_error(seq, rtnl.portid, -errno.ENOENT, data))
        return len(data)

    fake.send = answer  # type: ignore[method-assign]
    assert neigh.lookup(rtnl, 5, "192.0.2.3") is None


@pytest.mark.parametrize(
    ("state", "usable"),
    [
        (neigh.NUD_REACHABLE, True),
        (neigh.NUD_STALE, True),
        (neigh.NUD_DELAY, True),
        (neigh.NUD_PERMANENT, True),
        (neigh.NUD_INCOMPLETE, False),
        (neigh.NUD_FAILED, False),
        (neigh.NUD_PROBE, False),
    ],
)
def test_usable_states(state: int, usable: bool) -> None:
    assert neigh.Neighbour("192.0.2.3", 1, state, MAC_TEXT).usable is usable
    assert not neigh.Neighbour("192.0.2.3", 1, state, None).usable


# -- announcement frames ------------------------------------------------------------------------


def test_unsolicited_na_fields() -> None:
    frame = build_na(MAC, "2001:db8:1::100")
    pkt = Ether(frame)
    assert pkt.dst == "33:33:00:00:00:01" and pkt.src == MAC_TEXT and pkt.type == 0x86DD
    ip6 = pkt[IPv6]
    assert ip6.src == "2001:db8:1::100" and ip6.dst == "ff02::1"
    assert ip6.hlim == 255 and ip6.nh == 58 and ip6.plen == 32
    na = pkt[ICMPv6ND_NA]
    assert (na.type, na.code) == (136, 0)
    assert (na.R, na.S, na.O) == (0, 0, 1)
    assert na.tgt == "2001:db8:1::100"
    opt = pkt[ICMPv6NDOptDstLLAddr]
    assert opt.type == 2 and opt.len == 1 and opt.lladdr == MAC_TEXT
    assert len(frame) == 14 + 40 + 32


def test_unsolicited_na_checksum() -> None:
    frame = build_na(MAC, "2001:db8:1::100")
    pkt = Ether(frame)
    sent = pkt[ICMPv6ND_NA].cksum
    del pkt[ICMPv6ND_NA].cksum
    assert Ether(bytes(pkt))[ICMPv6ND_NA].cksum == sent  # scapy's own computation
    # And independently: the one's-complement sum over pseudo-header + message is 0xffff.
    icmp = frame[54:]
    pseudo = frame[22:38] + frame[38:54] + struct.pack("!I3xB", len(icmp), 58)
    data = pseudo + icmp
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF


def test_gratuitous_arp_fields() -> None:
    frame = build_garp(MAC, "192.0.2.100")
    pkt = Ether(frame)
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == MAC_TEXT and pkt.type == 0x0806
    arp = pkt[ARP]
    assert (arp.hwtype, arp.ptype, arp.hwlen, arp.plen, arp.op) == (1, 0x0800, 6, 4, 1)
    assert arp.hwsrc == MAC_TEXT
    assert arp.psrc == arp.pdst == "192.0.2.100"
    assert arp.hwdst == "00:00:00:00:00:00"
    assert len(frame) == 60  # padded to the Ethernet minimum


# -- waiting for the IPv6 local route ------------------------------------------------------------


def run_cbpf(prog: bytes, packet: bytes) -> int:
    """Interpret the few classic BPF instructions local_route_filter() uses."""
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x30:  # ldb [k]
            if k >= len(packet):
                return 0
            acc = packet[k]
            pc += 1
        elif code == 0x20:  # ld [k], big-endian
            if k + 4 > len(packet):
                return 0
            acc = int.from_bytes(packet[k : k + 4], "big")
            pc += 1
        elif code == 0x15:  # jeq #k
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def route_msg(kind: int, family: int, dst: str, dst_len: int, table: int, rtype: int) -> bytes:
    msg = rtmsg()
    msg["header"]["type"] = kind
    msg["header"]["flags"] = 0
    msg["header"]["sequence_number"] = 0
    msg["header"]["pid"] = 0
    msg["family"] = family
    msg["dst_len"] = dst_len
    msg["table"] = table
    msg["proto"] = 2
    msg["scope"] = 0
    msg["type"] = rtype
    msg["attrs"] = [["RTA_TABLE", table], ["RTA_DST", dst]]
    msg.encode()
    return bytes(msg.data)


@pytest.mark.parametrize(
    ("kind", "family", "dst", "dst_len", "table", "rtype", "passes"),
    [
        (24, socket.AF_INET6, "2001:db8:1::100", 128, 255, 2, True),  # the local route: wanted
        (24, socket.AF_INET6, "2001:db8:1::101", 128, 255, 2, False),  # another address's
        (25, socket.AF_INET6, "2001:db8:1::100", 128, 255, 2, False),  # RTM_DELROUTE
        (24, socket.AF_INET6, "2001:db8:1::", 64, 254, 1, False),  # the prefix route
        (24, socket.AF_INET6, "2001:db8:1::100", 128, 255, 4, False),  # anycast
        (24, socket.AF_INET, "192.0.2.100", 32, 255, 2, False),  # IPv4 local route
    ],
)
def test_local_route_filter(
    kind: int, family: int, dst: str, dst_len: int, table: int, rtype: int, passes: bool
) -> None:
    prog = local_route_filter(socket.inet_pton(socket.AF_INET6, "2001:db8:1::100"))
    verdict = run_cbpf(prog, route_msg(kind, family, dst, dst_len, table, rtype))
    assert (verdict != 0) is passes


def notify_on_add(
    fake: FakeSock, move: AddressMove, events: FakeSock, notifications: list[bytes | BaseException]
) -> None:
    """Make the fake kernel queue `notifications` on `events` when the add is sent."""
    send = fake.send

    def send_and_notify(data: bytes) -> int:
        if data == move.add_msg:
            events.replies += notifications
        return send(data)

    fake.send = send_and_notify  # type: ignore[method-assign]


def test_ipv6_add_returns_only_once_its_own_local_route_is_in(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64)
    fake, events = use_fake(rtnl), fake_events(move)
    fake.replies += [rtnl.expected_ack(move.add_msg), rtnl.expected_ack(move.barrier_msg)]
    stale = route_msg(24, socket.AF_INET6, "2001:db8:1::100", 128, 255, 2)
    other = route_msg(24, socket.AF_INET6, "2001:db8:1::b", 128, 255, 2)
    mine = route_msg(24, socket.AF_INET6, "2001:db8:1::100", 128, 255, 2)
    events.replies.append(stale)  # queued before the add: must not count
    notify_on_add(fake, move, events, [other, mine])
    move.add()
    assert not events.replies  # dropped the stale one, skipped the other, stopped at its own
    assert fake.sent == [move.add_msg, move.barrier_msg]  # then waited on the RTNL lock
    assert not fake.replies
    move.close()


def test_rtnl_barrier_is_a_no_op_setlink(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64, watch_route=False)
    msg = ifinfmsg(move.barrier_msg)
    msg.decode()
    assert msg["header"]["type"] == 19  # RTM_SETLINK
    assert msg["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK
    assert msg["index"] == 7
    assert msg["flags"] == 0 and msg["change"] == 0
    assert msg["attrs"] == []  # nothing to change


def test_ipv6_add_whose_route_never_comes_times_out_clearly(rtnl: Rtnl) -> None:
    move = AddressMove(rtnl, 7, "2001:db8:1::100", 64, route_timeout=0.25)
    fake, events = use_fake(rtnl), fake_events(move)
    fake.replies.append(rtnl.expected_ack(move.add_msg))
    notify_on_add(fake, move, events, [BlockingIOError(errno.EAGAIN, "SO_RCVTIMEO")])
    with pytest.raises(AddressError) as info:
        move.add()
    assert info.value.errno == errno.ETIMEDOUT
    assert "local route did not appear within 0.25 s" in str(info.value)
    move.close()


def test_ipv4_moves_need_no_route_wait(rtnl: Rtnl) -> None:
    assert AddressMove(rtnl, 7, "192.0.2.100", 24).events is None
    with_wait = AddressMove(rtnl, 7, "2001:db8:1::100", 64)
    assert with_wait.events is not None
    with_wait.close()
    assert AddressMove(rtnl, 7, "2001:db8:1::100", 64, watch_route=False).events is None
