"""sessmob.net on a real kernel: pre-encoded address moves, announcements, neighbour resolution.

Topology (built here, removed at the end, also after a failure or Ctrl-C):

    <p>a   <p>b   <p>c       three hosts, each with eth0 on one bridge; <p>c plays the CN
      \\     |     /
        <p>br: br0

Addresses: 2001:db8:1::a/b/c/64 and 192.0.2.10/11/12/24; the moving address is
2001:db8:1::100/64 or 192.0.2.100/24. The micro-benchmark (`-k bench -s`) prints median/p99
of add()/delete()/send() against pyroute2's IPRoute.addr().
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sessmob.net import neigh
from sessmob.net.announce import Announcer
from sessmob.net.rtnl import AddressError, AddressMove, Rtnl
from sessmob.netns import entered, socket_in

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

HOSTS = {
    "a": ("2001:db8:1::a", "192.0.2.10"),
    "b": ("2001:db8:1::b", "192.0.2.11"),
    "c": ("2001:db8:1::c", "192.0.2.12"),
}
MOVING = {6: ("2001:db8:1::100", 64), 4: ("192.0.2.100", 24)}
IFNAME = "eth0"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def sysctl(ns: str, key: str, value: str) -> None:
    # /proc/sys/net belongs to the namespace of the thread that opens it.
    with entered(ns), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
        f.write(value)


def remove_namespaces(names: list[str], owner: int) -> None:
    # Only the process that made them: a forked child (pyroute2 forks, and SIGTERM unwinds
    # pytest in it) must not tear down the parent's topology.
    if os.getpid() != owner:
        return
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Topo:
    prefix: str
    ns: dict[str, str]  # role -> namespace name
    mac: dict[str, str]  # role -> MAC of eth0
    rtnl: dict[str, Rtnl]  # role -> open netlink socket
    ifindex: dict[str, int]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    prefix = f"smn{secrets.token_hex(3)[:5]}-"
    names = {role: prefix + role for role in ("br", "a", "b", "c")}
    created: list[str] = []
    owner = os.getpid()
    atexit.register(remove_namespaces, created, owner)  # also if pytest itself dies
    rtnls: dict[str, Rtnl] = {}
    try:
        for name in names.values():
            ip("netns", "add", name)
            created.append(name)
            for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
                sysctl(name, key, "0")
        br = names["br"]
        ip("-n", br, "link", "add", "br0", "type", "bridge")
        ip("-n", br, "link", "set", "br0", "up")
        for role in ("a", "b", "c"):
            ns = names[role]
            ip(
                "-n",
                br,
                "link",
                "add",
                f"p{role}",
                "type",
                "veth",
                "peer",
                "name",
                IFNAME,
                "netns",
                ns,
            )
            ip("-n", br, "link", "set", f"p{role}", "master", "br0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", IFNAME, "up")
            v6, v4 = HOSTS[role]
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", IFNAME, "nodad")
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", IFNAME)
            rtnls[role] = Rtnl.open(ns)
        yield Topo(
            prefix,
            names,
            {r: rtnls[r].link_mac(IFNAME) for r in rtnls},
            rtnls,
            {r: rtnls[r].ifindex(IFNAME) for r in rtnls},
        )
    finally:
        for r in rtnls.values():
            r.close()
        remove_namespaces(created, owner)
        created.clear()


def addr_snapshot(rtnl: Rtnl) -> list[tuple[int, str, int]]:
    return sorted((a.ifindex, a.addr, a.prefixlen) for a in rtnl.addresses())


def wait_for_lladdr(t: Topo, role: str, addr: str, mac: str, timeout: float = 1.0) -> float:
    """Poll role's neighbour entry for addr until it points at mac; return the seconds taken."""
    start = time.monotonic()
    while True:
        entry = neigh.lookup(t.rtnl[role], t.ifindex[role], addr)
        if entry is not None and entry.lladdr == mac:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{role}'s entry for {addr} is {entry}, wanted {mac}")
        time.sleep(0.0005)


# -- address add / delete ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [6, 4])
def test_add_then_delete_shows_in_the_address_table(topo: Topo, version: int) -> None:
    addr, plen = MOVING[version]
    r = topo.rtnl["a"]
    move = AddressMove(r, topo.ifindex["a"], addr, plen)
    assert not r.has_address(addr)
    move.add()
    try:
        assert r.is_local(addr)
        assert r.has_address(addr, topo.ifindex["a"])
        found = [a for a in r.addresses() if a.addr == addr]
        assert [(a.prefixlen, a.ifindex) for a in found] == [(plen, topo.ifindex["a"])]
        if version == 6:
            assert found[0].flags & 0x02  # IFA_F_NODAD
            assert not found[0].flags & 0x40  # never IFA_F_TENTATIVE
    finally:
        move.delete()
        move.close()
    assert not r.has_address(addr)
    assert not r.is_local(addr)
    assert r.slow_replies == 0  # every ACK matched the precomputed bytes


@pytest.mark.parametrize("split", [False, True], ids=["add", "add-nowait+wait_usable"])
@pytest.mark.parametrize("version", [6, 4])
def test_address_receives_packets_as_soon_as_add_returns(
    topo: Topo, version: int, split: bool
) -> None:
    # IPv6 inserts the local route from a workqueue after the ACK; add() waits for it.
    addr, plen = MOVING[version]
    r = topo.rtnl["a"]
    with AddressMove(r, topo.ifindex["a"], addr, plen) as move:
        misses = []
        for i in range(200):
            if split:
                move.add(wait=False)
                move.wait_usable()
            else:
                move.add()
            if not r.is_local(addr):
                misses.append(i)
            move.delete()
        assert misses == []
        if move.events is not None:  # the kernel filter let nothing else through
            with pytest.raises(BlockingIOError):
                move.events.sock.recv(4096, socket.MSG_DONTWAIT)


@pytest.mark.parametrize("version", [6, 4])
def test_duplicate_add_and_missing_delete_fail_and_change_nothing(topo: Topo, version: int) -> None:
    addr, plen = MOVING[version]
    r = topo.rtnl["b"]
    move = AddressMove(r, topo.ifindex["b"], addr, plen)
    move.add()
    try:
        before = addr_snapshot(r)
        with pytest.raises(AddressError) as info:
            move.add()
        assert info.value.errno == errno.EEXIST
        assert f"RTM_NEWADDR {addr}/{plen} on ifindex {topo.ifindex['b']} in {topo.ns['b']}" in str(
            info.value
        )
        assert addr_snapshot(r) == before
    finally:
        move.delete()
    before = addr_snapshot(r)
    with pytest.raises(AddressError) as info:
        move.delete()
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert "RTM_DELADDR" in str(info.value)
    assert addr_snapshot(r) == before
    # After the errors the socket is clean: the next pair takes the fast path again.
    slow = r.slow_replies
    move.add()
    move.delete()
    move.close()
    assert r.slow_replies == slow


def test_lost_route_notifications_still_leave_the_address_usable(topo: Topo) -> None:
    # Overrun the notification socket (tiny buffer, adds by another party): add() gets ENOBUFS
    # and must fall back to the RTNL barrier + a route lookup instead of trusting or failing.
    addr, plen = MOVING[6]
    r = topo.rtnl["a"]
    other = AddressMove(r, topo.ifindex["a"], addr, plen, watch_route=False)
    with AddressMove(r, topo.ifindex["a"], addr, plen) as move:
        assert move.events is not None
        move.events.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        for _ in range(30):
            other.add()
            other.delete()
        misses = []
        for i in range(50):
            move.add()
            if not r.is_local(addr):
                misses.append(i)
            move.delete()
            if i % 2 == 0:  # keep overrunning it
                for _ in range(10):
                    other.add()
                    other.delete()
        assert misses == []


# -- announcements -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [6, 4])
def test_announcement_reaches_the_cn_byte_for_byte(topo: Topo, version: int) -> None:
    addr, _ = MOVING[version]
    ethertype = 0x86DD if version == 6 else 0x0806
    cap = socket_in(topo.ns["c"], socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    cap.bind((IFNAME, ethertype))  # Python converts the bind tuple to network order
    cap.settimeout(1.0)
    with cap, Announcer(topo.ns["b"], IFNAME, addr) as ann:
        assert ann.mac == topo.mac["b"]
        ann.send()
        while True:
            frame = cap.recv(2048)
            if frame[6:12] == bytes.fromhex(ann.mac.replace(":", "")) and frame == ann.frame:
                break


@pytest.mark.parametrize("version", [6, 4])
def test_move_switches_the_cn_at_once_and_tcp_follows(topo: Topo, version: int) -> None:
    addr, plen = MOVING[version]
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    on_a = AddressMove(topo.rtnl["a"], topo.ifindex["a"], addr, plen)
    on_b = AddressMove(topo.rtnl["b"], topo.ifindex["b"], addr, plen)
    announce_b = Announcer(topo.ns["b"], IFNAME, addr)
    on_a.add()
    moved = False
    try:
        # The CN knows the address at A, as it would before a migration.
        assert neigh.resolve(topo.ns["c"], IFNAME, addr) == topo.mac["a"]
        before = neigh.lookup(topo.rtnl["c"], topo.ifindex["c"], addr)
        assert before is not None and before.usable and before.lladdr == topo.mac["a"]

        on_a.delete()
        on_b.add()
        moved = True
        # Control: the move alone tells the CN nothing.
        entry = neigh.lookup(topo.rtnl["c"], topo.ifindex["c"], addr)
        assert entry is not None and entry.lladdr == topo.mac["a"]

        announce_b.send()
        # Without the announcement the CN would keep A's MAC until NUD re-probes (seconds).
        wait_for_lladdr(topo, "c", addr, topo.mac["b"], timeout=0.5)

        listener = socket_in(topo.ns["b"], family, socket.SOCK_STREAM)
        client = socket_in(topo.ns["c"], family, socket.SOCK_STREAM)
        with listener, client:
            listener.bind((addr, 5001))
            listener.listen(1)
            client.settimeout(1.0)  # via A it would hang until NUD gives up (seconds)
            client.connect((addr, 5001))
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
        entry = neigh.lookup(topo.rtnl["c"], topo.ifindex["c"], addr)
        assert entry is not None and entry.lladdr == topo.mac["b"]
    finally:
        announce_b.close()
        if moved:
            on_b.delete()
        else:
            with contextlib.suppress(AddressError):  # wherever the test stopped
                on_a.delete()
        on_a.close()
        on_b.close()


@pytest.mark.parametrize("version", [6, 4])
def test_back_and_forth_moves_switch_the_cn_every_time(topo: Topo, version: int) -> None:
    # Moves closer together than IPv4's 1 s ARP locktime: the gratuitous ARP must override.
    addr, plen = MOVING[version]
    moves = {r: AddressMove(topo.rtnl[r], topo.ifindex[r], addr, plen) for r in ("a", "b")}
    announcers = {r: Announcer(topo.ns[r], IFNAME, addr) for r in ("a", "b")}
    holder = "a"
    moves["a"].add()
    try:
        # The CN may still hold an entry from an earlier test: placing the address announces it.
        neigh.resolve(topo.ns["c"], IFNAME, addr)
        announcers["a"].send()
        wait_for_lladdr(topo, "c", addr, topo.mac["a"], timeout=0.5)
        for _ in range(20):
            new = "b" if holder == "a" else "a"
            moves[holder].delete()
            moves[new].add()
            holder = new
            announcers[new].send()
            wait_for_lladdr(topo, "c", addr, topo.mac[new], timeout=0.5)
    finally:
        moves[holder].delete()
        for m in moves.values():
            m.close()
        for a in announcers.values():
            a.close()


# -- neighbour resolution ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [6, 4])
def test_resolve_returns_the_mac_and_leaves_a_usable_entry(topo: Topo, version: int) -> None:
    target = HOSTS["c"][0 if version == 6 else 1]
    ip("-n", topo.ns["a"], "neigh", "flush", "dev", IFNAME)
    stale = neigh.lookup(topo.rtnl["a"], topo.ifindex["a"], target)
    assert stale is None or not stale.usable
    assert neigh.resolve(topo.ns["a"], IFNAME, target) == topo.mac["c"]
    entry = neigh.lookup(topo.rtnl["a"], topo.ifindex["a"], target)
    assert entry is not None and entry.usable and entry.lladdr == topo.mac["c"]
    # A second call finds the entry without provoking anything.
    assert neigh.resolve(topo.ns["a"], IFNAME, target, timeout=0.0) == topo.mac["c"]


@pytest.mark.parametrize("target", ["2001:db8:1::dead", "192.0.2.222"])
def test_resolve_of_an_absent_host_times_out_clearly(topo: Topo, target: str) -> None:
    start = time.monotonic()
    with pytest.raises(neigh.NeighError) as info:
        neigh.resolve(topo.ns["a"], IFNAME, target, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 1.0
    assert info.value.errno == errno.ETIMEDOUT
    assert target in str(info.value) and topo.ns["a"] in str(info.value)


@pytest.mark.parametrize("version", [6, 4])
def test_held_by_other_asks_afresh_and_ignores_an_old_entry(topo: Topo, version: int) -> None:
    """What an exporting device in doubt asks: who answers for the session address now."""
    addr, plen = ("2001:db8:1::77", 64) if version == 6 else ("192.0.2.77", 24)
    ip("-n", topo.ns["b"], "addr", "add", f"{addr}/{plen}", "dev", IFNAME, "nodad")
    assert neigh.held_by_other(topo.ns["a"], IFNAME, addr, timeout=0.5) == topo.mac["b"]
    ip("-n", topo.ns["b"], "addr", "del", f"{addr}/{plen}", "dev", IFNAME)
    old = neigh.lookup(topo.rtnl["a"], topo.ifindex["a"], addr)
    assert old is not None and old.usable  # a's table still points at b ...
    start = time.monotonic()
    assert neigh.held_by_other(topo.ns["a"], IFNAME, addr, timeout=0.3) is None  # ... no one
    assert time.monotonic() - start < 1.0
    ip("-n", topo.ns["c"], "addr", "add", f"{addr}/{plen}", "dev", IFNAME, "nodad")
    assert neigh.held_by_other(topo.ns["a"], IFNAME, addr, timeout=0.5) == topo.mac["c"]


def test_resolve_without_a_route_says_so(topo: Topo) -> None:
    with pytest.raises(neigh.NeighError) as info:
        neigh.resolve(topo.ns["a"], IFNAME, "203.0.113.9", timeout=0.2)
    assert info.value.errno == errno.ENETUNREACH
    assert "203.0.113.9" in str(info.value)


# -- micro-benchmark (numbers only, no timed assertion) ----------------------------------------


def _stats(samples_ns: list[int]) -> str:
    s = sorted(samples_ns)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return f"median {statistics.median(s) / 1e3:8.1f} us   p99 {p99 / 1e3:8.1f} us"


@pytest.mark.parametrize("version", [6, 4])
def test_bench_add_delete_vs_pyroute2(
    topo: Topo, version: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from pyroute2 import IPRoute

    runs = 300
    addr, plen = MOVING[version]
    ns, index = topo.ns["a"], topo.ifindex["a"]
    # Without the IPv6 route wait: what the two syscalls alone cost.
    bare = AddressMove(topo.rtnl["a"], index, addr, plen, watch_route=False)
    bare_add = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        bare.add()
        bare_add.append(time.perf_counter_ns() - t0)
        bare.delete()
    move = AddressMove(topo.rtnl["a"], index, addr, plen)
    add_ns, del_ns, pair_ns = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        move.add()
        t1 = time.perf_counter_ns()
        move.delete()
        t2 = time.perf_counter_ns()
        add_ns.append(t1 - t0)
        del_ns.append(t2 - t1)
        pair_ns.append(t2 - t0)

    p_add, p_del, p_pair = [], [], []
    with entered(ns):  # IPRoute(netns=...) would fork a helper process
        ipr = IPRoute()
    with ipr:
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            ipr.addr("add", index=index, address=addr, prefixlen=plen)
            t1 = time.perf_counter_ns()
            ipr.addr("del", index=index, address=addr, prefixlen=plen)
            t2 = time.perf_counter_ns()
            p_add.append(t1 - t0)
            p_del.append(t2 - t1)
            p_pair.append(t2 - t0)
    move.close()

    send_ns = []
    with Announcer(ns, IFNAME, addr) as ann:
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            ann.send()
            send_ns.append(time.perf_counter_ns() - t0)

    # The whole takeover as the freeze window sees it: delete on one device, add + announce on
    # the other, alternating a -> b -> a.
    sides = {r: (AddressMove(topo.rtnl[r], topo.ifindex[r], addr, plen),
                 Announcer(topo.ns[r], IFNAME, addr)) for r in ("a", "b")}  # fmt: skip
    move_ns = []
    holder = "a"
    sides["a"][0].add()
    for _ in range(runs):
        new = "b" if holder == "a" else "a"
        t0 = time.perf_counter_ns()
        sides[holder][0].delete()
        sides[new][0].add()
        sides[new][1].send()
        move_ns.append(time.perf_counter_ns() - t0)
        holder = new
    sides[holder][0].delete()
    for m, a in sides.values():
        m.close()
        a.close()

    with capsys.disabled():
        print(f"\nIPv{version}, {runs} runs, address {addr}/{plen} in {ns}")
        print(f"  AddressMove.add()          {_stats(add_ns)}")
        if version == 6:
            print(f"  add() without route wait  {_stats(bare_add)}")
        print(f"  AddressMove.delete()       {_stats(del_ns)}")
        print(f"  add()+delete()             {_stats(pair_ns)}")
        print(f"  pyroute2 addr('add')       {_stats(p_add)}")
        print(f"  pyroute2 addr('del')       {_stats(p_del)}")
        print(f"  pyroute2 add+del           {_stats(p_pair)}")
        print(f"  Announcer.send()           {_stats(send_ns)}")
        print(f"  move: delete+add+send      {_stats(move_ns)}")
    assert not topo.rtnl["a"].has_address(addr)
