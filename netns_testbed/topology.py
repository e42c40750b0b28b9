"""Build named topologies out of network namespaces; the devices of every netns test.

``lan``: a communication partner ``cn`` and two devices ``ed`` (exporting) and ``id``
(importing), each a namespace with ``eth0`` on one bridge ``br0`` that lives in a namespace of
its own (ports ``cn``, ``ed``, ``id``)::

    <p>cn eth0 ──┐
    <p>ed eth0 ──┼── cn|ed|id ── br0   (namespace <p>br)
    <p>id eth0 ──┘

Everything is built with pyroute2 from inside the namespaces, so nothing is ever created in the
root namespace. A :class:`Testbed` tears itself down on ``with`` exit, at interpreter exit, on
SIGTERM/SIGHUP (if no one else handles them) and on Ctrl-C; a run whose owner died anyway is
cleaned by ``python -m netns_testbed down``.

pyroute2 0.9 notes: an ``IPRoute`` socket is per *thread* (another thread silently opens a new one
in its own namespace), and ``IPRoute(netns=...)`` forks a helper per socket. So each namespace's
``IPRoute`` is opened inside :func:`sessmob.netns.entered`, used from that thread only and closed
at the end of the build (an open netlink socket would keep a deleted namespace alive).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import os
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns

from netns_testbed import runs
from sessmob.netns import entered, socket_in

IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
_BR_STATE_FORWARDING = 3
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

#: Port used by the reachability check; nothing listens on it, so a RST proves the round trip.
_PROBE_PORT = 9


class TestbedError(RuntimeError):
    """Building or using a testbed failed; the message says which step and namespace."""

    __test__ = False


class TestbedUnavailable(TestbedError):
    """This process cannot create network namespaces (not root, or no CAP_SYS_ADMIN)."""

    __test__ = False


@dataclass(frozen=True)
class Host:
    """One device of a topology as seen from inside its namespace."""

    name: str  # "cn" / "ed" / "id"
    netns: str  # full namespace name, e.g. "sm3fa9c1-cn"
    ifname: str  # "eth0"
    ifindex: int
    mac: str  # "aa:bb:cc:dd:ee:ff" of eth0
    addr6: str
    addr4: str
    prefixlen6: int = 64
    prefixlen4: int = 24


@dataclass(frozen=True)
class _HostSpec:
    name: str
    addr6: str
    addr4: str


_LAN_HOSTS = (
    _HostSpec("cn", "2001:db8:1::1", "192.0.2.1"),
    _HostSpec("ed", "2001:db8:1::2", "192.0.2.2"),
    _HostSpec("id", "2001:db8:1::3", "192.0.2.3"),
)
_BRIDGE_NS = "br"

# Written before the veths exist, so eth0 inherits them from "default" (no DAD, RS or SLAAC on
# the link-local address either); eth0 is then set explicitly as well.
_HOST_SYSCTLS = {
    f"net/ipv6/conf/{dev}/{key}": "0"
    for dev in ("all", "default")
    for key in ("accept_dad", "accept_ra", "autoconf", "router_solicitations")
}
_HOST_SYSCTLS |= {"net/ipv6/conf/default/dad_transmits": "0"}
_ETH0_SYSCTLS = {
    f"net/ipv6/conf/eth0/{key}": "0"
    for key in ("accept_dad", "accept_ra", "autoconf", "router_solicitations", "dad_transmits")
}
# The bridge namespace only switches frames: no IPv6 on its ports means no RS/MLD/DAD chatter.
_BRIDGE_SYSCTLS = {
    "net/ipv6/conf/all/disable_ipv6": "1",
    "net/ipv6/conf/default/disable_ipv6": "1",
}


# -- process-wide cleanup -----------------------------------------------------------------------

_live: weakref.WeakSet[Testbed] = weakref.WeakSet()
_live_lock = threading.Lock()
_hooks_installed = False


def _teardown_all() -> None:
    with _live_lock:
        beds = list(_live)
    for tb in beds:
        with contextlib.suppress(Exception):
            tb.teardown()


def _on_fatal_signal(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C does: `with` blocks and fixtures run their teardown, then atexit.
    raise SystemExit(128 + signum)


def _install_hooks() -> None:
    """atexit cleanup, and SIGTERM/SIGHUP -> SystemExit where nobody else handles them."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_teardown_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_fatal_signal)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while tearing down, so a second Ctrl-C cannot leave half a
    testbed behind; delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if handler is None or handler is signal.SIG_IGN:
            continue
        old[sig] = signal.signal(sig, lambda n, f: pending.append(n))
    try:
        yield
    finally:
        for old_sig, old_handler in old.items():
            signal.signal(old_sig, old_handler)
        for signum in pending:
            signal.raise_signal(signum)


# -- the testbed --------------------------------------------------------------------------------


class Testbed:
    """A built topology: its namespaces, hosts and the processes started in them.

    Use as a context manager (``with build_lan() as tb:``); :meth:`teardown` is idempotent.
    """

    __test__ = False

    session_addr6: str = "2001:db8:1::100"
    session_prefixlen6: int = 64
    session_addr4: str = "192.0.2.100"
    session_prefixlen4: int = 24

    def __init__(self, prefix: str, topology: str, namespaces: list[str]) -> None:
        self.prefix = prefix
        self.topology = topology
        self.namespaces = list(namespaces)
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()
        self._down = False
        self._pid = os.getpid()
        with _live_lock:
            _live.add(self)
        _install_hooks()

    def __repr__(self) -> str:
        state = "down" if self._down else "up"
        return f"<Testbed {self.topology} {self.prefix} {state} hosts={sorted(self.hosts)}>"

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def ns(self, host: str) -> str:
        """Full namespace name of ``host`` (also accepts the bridge namespace key ``br``)."""
        name = f"{self.prefix}{host}"
        if name not in self.namespaces:
            raise KeyError(f"testbed {self.prefix} has no host {host!r} (has {sorted(self.hosts)})")
        return name

    def _argv(self, host: str, argv: list[str]) -> list[str]:
        if self._down:
            raise TestbedError(f"testbed {self.prefix} is torn down")
        if isinstance(argv, str):
            raise TypeError("argv must be a list of strings, not a shell string")
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside ``host``'s namespace; check=True and captured text output by
        default (any subprocess.run keyword overrides)."""
        kw.setdefault("check", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._argv(host, argv), **kw)

    def popen(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside ``host``'s namespace; it is killed at teardown."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(host, argv), **kw)
        with self._lock:
            self._procs.append(proc)
        return proc

    def detach(self, owner_pid: int) -> None:
        """Leave the run up after this process exits, owned by ``owner_pid`` (the ``up`` CLI
        hands it to the calling shell); ``down`` removes it once that process is gone."""
        runs.set_owner(self.prefix, owner_pid)
        with _live_lock:
            _live.discard(self)

    def teardown(self) -> None:
        """Kill tracked and stray processes, delete the namespaces and the run record.

        Does nothing in a forked child: its exit (atexit, `with`) must not take the parent's
        testbed down.
        """
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._down:
                return
            self._down = True
            procs, self._procs = self._procs, []
        with _live_lock:
            _live.discard(self)
        with _signals_deferred():
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.terminate()
            deadline = time.monotonic() + 1.0
            for p in procs:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            runs.remove_namespaces(self.namespaces)
            runs.remove_run(self.prefix)


# -- building blocks ----------------------------------------------------------------------------


def _create_namespaces(names: list[str]) -> None:
    """Create named namespaces without forking: a helper thread unshares its network namespace
    and bind-mounts it (pyroute2.netns.create forks a child per namespace, ~15 ms each)."""
    error: list[BaseException] = []

    def work() -> None:
        try:
            for name in names:
                if _libc.unshare(_CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    exc_type = (
                        TestbedUnavailable if err in (errno.EPERM, errno.EACCES) else TestbedError
                    )
                    raise exc_type(f"unshare(CLONE_NEWNET) for {name!r} failed: {os.strerror(err)}")
                try:
                    _pr_netns.attach(os.path.join(runs.NETNS_DIR, name), "thread-self")
                except OSError as e:
                    if e.errno in (errno.EPERM, errno.EACCES):
                        raise TestbedUnavailable(f"cannot create namespace {name!r}: {e}") from e
                    raise TestbedError(f"cannot create namespace {name!r}: {e}") from e
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=work, name="netns-create")
    t.start()
    t.join()
    if error:
        raise error[0]


def _write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Write /proc/sys/net values of ``netns``: /proc/sys/net follows the *calling thread's*
    namespace, so a thread inside the namespace suffices (verified). /proc/net does *not*: it
    follows the process's main thread; use /proc/thread-self/net from other threads."""
    with entered(netns):
        for key, value in values.items():
            path = f"/proc/sys/{key}"
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as e:
                raise TestbedError(
                    f"[{netns}] cannot set {key.replace('/', '.')}={value}: {e}"
                ) from e


@contextlib.contextmanager
def _iproute(netns: str) -> Iterator[IPRoute]:
    """An IPRoute whose socket lives in ``netns``; use it from this thread only."""
    with entered(netns):
        ipr = IPRoute()  # the socket of *this thread* is opened here, inside netns
    try:
        yield ipr
    finally:
        ipr.close()


def _ifindex(ipr: IPRoute, ifname: str, netns: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise TestbedError(f"[{netns}] interface {ifname!r} not found")
    return int(idx[0])


def _solicited_node_group(addr6: str) -> str:
    """ff02::1:ffXX:XXXX of ``addr6`` as /proc/net/igmp6 spells it (32 hex digits)."""
    return "ff0200000000000000000001ff" + socket.inet_pton(socket.AF_INET6, addr6)[13:].hex()


def _host_ready(ipr: IPRoute, netns: str, ifindex: int, addr6: str) -> str | None:
    """None if eth0 of ``netns`` can talk, else what is still missing (for the error)."""
    link = ipr.get_links(ifindex)[0]
    if link.get_attr("IFLA_OPERSTATE") != "UP":
        return f"eth0 operstate {link.get_attr('IFLA_OPERSTATE')}"
    addrs = ipr.get_addr(index=ifindex, family=socket.AF_INET6, address=addr6)
    if not addrs:
        return f"{addr6} missing"
    flags = addrs[0].get_attr("IFA_FLAGS") or addrs[0]["flags"]
    if flags & IFA_F_TENTATIVE:
        return f"{addr6} tentative"
    # The solicited-node group is joined from a workqueue; until then NS for addr6 are dropped.
    group = _solicited_node_group(addr6)
    with entered(netns), open("/proc/thread-self/net/igmp6") as f:
        joined = any(line.split()[2] == group for line in f if line.split()[1] == "eth0")
    return None if joined else f"solicited-node group of {addr6} not joined"


def _bridge_ready(ipr: IPRoute, ports: list[str]) -> str | None:
    """None once every port is UP and forwarding, else which one is not."""
    state = {}
    for link in ipr.get_links(family=socket.AF_BRIDGE):
        info = link.get_attr("IFLA_PROTINFO")
        state[link.get_attr("IFLA_IFNAME")] = (
            link.get_attr("IFLA_OPERSTATE"),
            info.get_attr("IFLA_BRPORT_STATE") if info is not None else None,
        )
    for port in ports:
        if state.get(port) != ("UP", _BR_STATE_FORWARDING):
            return f"bridge port {port} is {state.get(port)}"
    return None


def _wait_ready(checks: list[Callable[[], str | None]], deadline: float, what: str) -> None:
    """Poll ``checks`` until all pass. Carrier, qdisc activation and bridge port state are
    applied by the kernel's linkwatch work, which lags a few ms behind "link up" on a busy
    machine; a neighbour solicitation sent before that is lost and costs a 1 s retransmit."""
    while True:
        missing = [m for m in (c() for c in checks) if m is not None]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TestbedError(f"{what} not ready after build: {'; '.join(missing)}")
        time.sleep(0.001)


def _wait_reachable(src_ns: str, dst: str, family: int, deadline: float) -> None:
    """A TCP connect to a closed port: the RST proves both directions work (ND/ARP included)."""
    last: BaseException | None = None
    while True:
        s = socket_in(src_ns, family, socket.SOCK_STREAM)
        try:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            s.connect((dst, _PROBE_PORT))
            return  # something listens there: reachable as well
        except ConnectionRefusedError:
            return
        except OSError as e:
            last = e
        finally:
            s.close()
        if time.monotonic() >= deadline:
            raise TestbedError(f"[{src_ns}] {dst} unreachable after build: {last}")
        time.sleep(0.005)


# -- topologies ---------------------------------------------------------------------------------


def build_lan(prefix: str | None = None) -> Testbed:
    """Build ``lan`` (cn, ed, id on one bridge); see the module docstring.

    The session address (``Testbed.session_addr6/4``) is not added anywhere: whoever plays the
    exporting device adds it to ed.
    """
    _install_hooks()  # before anything exists, so a SIGTERM during the build also cleans up
    prefix = runs.new_prefix() if prefix is None else runs.normalize_prefix(prefix)
    names = [prefix + _BRIDGE_NS, *(prefix + h.name for h in _LAN_HOSTS)]
    runs.create_record(prefix, "lan", names, os.getpid())
    tb = Testbed(prefix, "lan", names)
    try:
        _build_lan(tb)
    except BaseException:
        tb.teardown()
        raise
    return tb


def _build_lan(tb: Testbed) -> None:
    p = tb.prefix
    br_ns = p + _BRIDGE_NS
    _create_namespaces(tb.namespaces)
    _write_sysctls(br_ns, _BRIDGE_SYSCTLS)
    for h in _LAN_HOSTS:
        _write_sysctls(p + h.name, _HOST_SYSCTLS)

    with _iproute(br_ns) as ipr:
        ipr.link("set", index=_ifindex(ipr, "lo", br_ns), state="up")
        ipr.link(
            "add",
            ifname="br0",
            kind="bridge",
            br_stp_state=0,
            br_forward_delay=0,
            br_mcast_snooping=0,  # flood ND/MLD: an address that moves needs no MLD report
        )
        br0 = _ifindex(ipr, "br0", br_ns)
        for h in _LAN_HOSTS:
            host_ns = p + h.name
            try:
                ipr.link(
                    "add", ifname=h.name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": host_ns}
                )
            except Exception as e:
                raise TestbedError(
                    f"[{br_ns}] cannot create veth {h.name} <-> {host_ns}/eth0: {e}"
                ) from e
            ipr.link("set", index=_ifindex(ipr, h.name, br_ns), master=br0, state="up")
        ipr.link("set", index=br0, state="up")

    for h in _LAN_HOSTS:
        host_ns = p + h.name
        _write_sysctls(host_ns, _ETH0_SYSCTLS)
        with _iproute(host_ns) as ipr:
            ipr.link("set", index=_ifindex(ipr, "lo", host_ns), state="up")
            idx = _ifindex(ipr, "eth0", host_ns)
            ipr.link("set", index=idx, state="up")
            try:
                ipr.addr("add", index=idx, address=h.addr6, prefixlen=64, flags=IFA_F_NODAD)
                ipr.addr("add", index=idx, address=h.addr4, prefixlen=24)
            except Exception as e:
                raise TestbedError(f"[{host_ns}] cannot add addresses to eth0: {e}") from e
            mac = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        tb.hosts[h.name] = Host(
            name=h.name,
            netns=host_ns,
            ifname="eth0",
            ifindex=idx,
            mac=str(mac),
            addr6=h.addr6,
            addr4=h.addr4,
        )

    deadline = time.monotonic() + 5.0
    with contextlib.ExitStack() as stack:
        br_ipr = stack.enter_context(_iproute(br_ns))
        ports = [h.name for h in _LAN_HOSTS]
        checks: list[Callable[[], str | None]] = [functools.partial(_bridge_ready, br_ipr, ports)]
        for host in tb.hosts.values():
            ipr = stack.enter_context(_iproute(host.netns))
            checks.append(functools.partial(_host_ready, ipr, host.netns, host.ifindex, host.addr6))
        _wait_ready(checks, deadline, f"testbed {p}")
    cn, ed, idev = (tb.hosts[n] for n in ("cn", "ed", "id"))
    for src, dst in ((cn, ed), (cn, idev), (ed, idev)):
        _wait_reachable(src.netns, dst.addr6, socket.AF_INET6, deadline)
        _wait_reachable(src.netns, dst.addr4, socket.AF_INET, deadline)


TOPOLOGIES: dict[str, Callable[[str | None], Testbed]] = {"lan": build_lan}
