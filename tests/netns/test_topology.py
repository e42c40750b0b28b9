"""The lan testbed on the real kernel: reachability, addresses, settings, teardown, CLI."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from netns_testbed import runs
from netns_testbed.topology import Testbed, TestbedError, build_lan
from sessmob.netns import entered, socket_in

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("cn", "ed", "id")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "netns_testbed", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _cli_popen(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "netns_testbed", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _addresses(netns: str) -> set[str]:
    with entered(netns):
        ipr = IPRoute()
        try:
            return {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()}
        finally:
            ipr.close()


def _gone(prefix: str) -> bool:
    return not runs.namespaces_with_prefix(prefix) and not os.path.exists(runs.record_path(prefix))


def _roundtrip(src_ns: str, dst_ns: str, addr: str, family: int) -> None:
    srv = socket_in(dst_ns, family)
    cli = socket_in(src_ns, family)
    try:
        srv.bind((addr, 0))
        srv.listen(1)
        cli.settimeout(2)
        cli.connect((addr, srv.getsockname()[1]))
        conn, _ = srv.accept()
        with conn:
            cli.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.sendall(b"pong")
            assert cli.recv(4) == b"pong"
    finally:
        srv.close()
        cli.close()


# -- the built topology -------------------------------------------------------------------------


def test_hosts_describe_their_namespaces(lan: Testbed) -> None:
    assert runs.AUTO_PREFIX_RE.match(lan.prefix)
    assert sorted(lan.hosts) == sorted(HOSTS)
    for name, h in lan.hosts.items():
        assert h.name == name
        assert h.netns == lan.ns(name) == lan.prefix + name
        assert h.ifname == "eth0"
        link = json.loads(lan.run(name, ["ip", "-j", "link", "show", "dev", "eth0"]).stdout)[0]
        assert link["ifindex"] == h.ifindex
        assert link["address"] == h.mac
        assert "UP" in link["flags"]
    assert lan.hosts["cn"].addr6 == "2001:db8:1::1" and lan.hosts["cn"].addr4 == "192.0.2.1"
    assert lan.hosts["ed"].addr6 == "2001:db8:1::2" and lan.hosts["ed"].addr4 == "192.0.2.2"
    assert lan.hosts["id"].addr6 == "2001:db8:1::3" and lan.hosts["id"].addr4 == "192.0.2.3"
    with pytest.raises(KeyError):
        lan.ns("nope")


@pytest.mark.parametrize("family", [socket.AF_INET6, socket.AF_INET], ids=["v6", "v4"])
@pytest.mark.parametrize("src,dst", list(itertools.permutations(HOSTS, 2)))
def test_reachable_between_all_hosts(lan: Testbed, src: str, dst: str, family: int) -> None:
    h = lan.hosts[dst]
    addr = h.addr6 if family == socket.AF_INET6 else h.addr4
    _roundtrip(lan.ns(src), h.netns, addr, family)


def test_session_addresses_are_exposed_but_not_assigned(lan: Testbed) -> None:
    assert (lan.session_addr6, lan.session_prefixlen6) == ("2001:db8:1::100", 64)
    assert (lan.session_addr4, lan.session_prefixlen4) == ("192.0.2.100", 24)
    for ns in lan.namespaces:
        addrs = _addresses(ns)
        assert lan.session_addr6 not in addrs
        assert lan.session_addr4 not in addrs


def test_host_addresses_are_not_tentative(lan: Testbed) -> None:
    for name, h in lan.hosts.items():
        info = json.loads(lan.run(name, ["ip", "-j", "-6", "addr", "show", "dev", "eth0"]).stdout)
        globals_ = [a for a in info[0]["addr_info"] if a["local"] == h.addr6]
        assert globals_, info
        assert not globals_[0].get("tentative"), globals_


def test_dad_and_autoconf_are_off(lan: Testbed) -> None:
    keys = [
        f"net.ipv6.conf.{dev}.{k}"
        for dev in ("all", "default", "eth0")
        for k in ("accept_dad", "accept_ra", "autoconf")
    ]
    for name in ("ed", "id", "cn"):
        out = lan.run(name, ["sysctl", "-n", *keys]).stdout.split()
        assert out == ["0"] * len(keys), (name, dict(zip(keys, out, strict=True)))


def test_bridge_forwards_immediately(lan: Testbed) -> None:
    br = json.loads(lan.run("br", ["ip", "-j", "-d", "link", "show", "dev", "br0"]).stdout)[0]
    info = br["linkinfo"]["info_data"]
    assert info["stp_state"] == 0
    assert info["forward_delay"] == 0
    assert info["mcast_snooping"] == 0
    ports = json.loads(lan.run("br", ["ip", "-j", "link", "show", "master", "br0"]).stdout)
    assert sorted(p["ifname"] for p in ports) == sorted(HOSTS)
    states = json.loads(lan.run("br", ["bridge", "-j", "link", "show"]).stdout)
    assert {s["ifname"]: s["state"] for s in states} == dict.fromkeys(HOSTS, "forwarding")


def test_run_and_popen(lan: Testbed) -> None:
    assert lan.run("ed", ["sh", "-c", "echo hi"]).stdout == "hi\n"
    with pytest.raises(subprocess.CalledProcessError):
        lan.run("ed", ["sh", "-c", "exit 3"])
    assert lan.run("ed", ["sh", "-c", "exit 3"], check=False).returncode == 3
    p = lan.popen(
        "cn",
        ["sh", "-c", "echo $$; exec cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        pid = int(p.stdout.readline())  # once it printed, it is inside the namespace
        assert runs.netns_pids([lan.ns("cn")]).get(lan.ns("cn")) == [pid]
    finally:
        p.kill()
        p.wait()


# -- building and tearing down ------------------------------------------------------------------


def _root_links() -> set[tuple[int, str]]:
    with IPRoute() as ipr:
        return {(int(link["index"]), str(link.get_attr("IFLA_IFNAME"))) for link in ipr.get_links()}


def test_build_is_quick_and_leaves_root_namespace_alone() -> None:
    before = _root_links()
    t0 = time.perf_counter()
    tb = build_lan()
    elapsed = time.perf_counter() - t0
    try:
        assert _root_links() == before
        assert elapsed < 1.0, f"build_lan() took {elapsed:.3f} s"
    finally:
        tb.teardown()
    assert _root_links() == before


def test_teardown_kills_processes_and_leaves_nothing() -> None:
    tb = build_lan()
    prefix = tb.prefix
    assert sorted(runs.namespaces_with_prefix(prefix)) == sorted(tb.namespaces)
    assert os.path.exists(runs.record_path(prefix))
    tracked = tb.popen("ed", ["sleep", "600"])
    # a process the testbed did not start (only the namespace scan can find it)
    stray = subprocess.Popen(["ip", "netns", "exec", tb.ns("id"), "sleep", "600"])
    deadline = time.monotonic() + 5
    while stray.pid not in runs.netns_pids([tb.ns("id")]).get(tb.ns("id"), []):
        assert time.monotonic() < deadline, "stray process never entered the namespace"
        time.sleep(0.01)
    tb.teardown()
    assert tracked.poll() is not None
    assert stray.wait(5) is not None
    assert _gone(prefix)
    tb.teardown()  # idempotent
    with pytest.raises(TestbedError):
        tb.run("cn", ["true"])


def test_teardown_on_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"), build_lan() as tb:
        prefix = tb.prefix
        raise RuntimeError("boom")
    assert _gone(prefix)


def test_prefix_collision_is_refused_and_harmless() -> None:
    prefix = runs.new_prefix()
    with build_lan(prefix) as tb:
        with pytest.raises(runs.RunError, match=r"in use|already has a record"):
            build_lan(prefix)
        assert sorted(runs.namespaces_with_prefix(prefix)) == sorted(tb.namespaces)
        _roundtrip(tb.ns("cn"), tb.ns("ed"), tb.hosts["ed"].addr6, socket.AF_INET6)
    assert _gone(prefix)


def test_build_failure_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from netns_testbed import topology

    made: list[str] = []
    real = topology._write_sysctls

    def failing(netns: str, values: dict[str, str]) -> None:
        made.append(netns)
        if netns.endswith("-id"):
            raise TestbedError("injected failure")
        real(netns, values)

    monkeypatch.setattr(topology, "_write_sysctls", failing)
    with pytest.raises(TestbedError, match="injected"):
        build_lan()
    prefix = made[0][: made[0].index("-") + 1]
    assert _gone(prefix)


# -- CLI and signals ----------------------------------------------------------------------------


def test_cli_round_trip_with_stale_owner() -> None:
    # The owner recorded by `up` is its parent: a shell that exits at once, so the run is stale.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    up = subprocess.run(
        ["sh", "-c", f"'{sys.executable}' -m netns_testbed up -j"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    prefix = info["prefix"]
    try:
        assert info["topology"] == "lan"
        assert info["hosts"]["ed"]["addr6"] == "2001:db8:1::2"
        assert info["session"]["addr4"] == "192.0.2.100"
        assert sorted(info["namespaces"]) == sorted(runs.namespaces_with_prefix(prefix))

        listed = {r["prefix"]: r for r in json.loads(_cli("list", "-j").stdout)}
        assert listed[prefix]["state"] == "stale"
        assert listed[prefix]["owner_pid"] == info["owner_pid"]
        human = _cli("list").stdout
        assert prefix in human and "stale" in human

        addr = _cli("exec", prefix, "cn", "--", "ip", "-j", "addr", "show", "dev", "eth0")
        assert addr.returncode == 0, addr.stderr
        assert "2001:db8:1::1" in addr.stdout
        assert _cli("exec", prefix.rstrip("-"), "ed", "--", "sh", "-c", "exit 7").returncode == 7
        assert _cli("exec", prefix, "nohost", "--", "true").returncode == 2

        down = _cli("down")
        assert down.returncode == 0, down.stderr
        assert f"removed {prefix}" in down.stdout
        assert _gone(prefix)
        assert prefix not in {r["prefix"] for r in json.loads(_cli("list", "-j").stdout)}
        assert _cli("down", prefix).returncode == 1  # no such run any more
    finally:
        runs.remove_run(prefix)


def test_cli_down_keeps_alive_runs_unless_named() -> None:
    up = _cli("up", "-j", "--owner", str(os.getpid()))
    assert up.returncode == 0, up.stderr
    prefix = json.loads(up.stdout)["prefix"]
    try:
        assert _cli("down").returncode == 0
        assert runs.namespaces_with_prefix(prefix), "down without PREFIX removed a live run"
        down = _cli("down", prefix)
        assert down.returncode == 0 and f"removed {prefix}" in down.stdout
        assert _gone(prefix)
    finally:
        runs.remove_run(prefix)


def test_cli_down_removes_orphans() -> None:
    tb = build_lan()
    prefix = tb.prefix
    try:
        os.unlink(runs.record_path(prefix))  # as if the record were lost
        states = {r.prefix: r.state for r in runs.list_runs()}
        assert states[prefix] == "orphan"
        down = _cli("down")
        assert f"removed {prefix} (orphan)" in down.stdout
        assert _gone(prefix)
    finally:
        tb.teardown()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_up_hold_tears_down_on_signal(sig: signal.Signals) -> None:
    proc = _cli_popen("up", "--hold", "-j")
    prefix = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        info = json.loads(line)
        prefix = info["prefix"]
        assert info["owner_pid"] == proc.pid
        assert sorted(runs.namespaces_with_prefix(prefix)) == sorted(info["namespaces"])
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert _gone(prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            runs.remove_run(prefix)


def test_library_user_killed_by_sigterm_tears_down() -> None:
    code = (
        "import sys, time\n"
        "from netns_testbed.topology import build_lan\n"
        "tb = build_lan()\n"
        "tb.popen('cn', ['sleep', '600'])\n"
        "print(tb.prefix, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    prefix = None
    try:
        assert proc.stdout is not None
        prefix = proc.stdout.readline().strip()
        assert runs.namespaces_with_prefix(prefix)
        proc.terminate()
        assert proc.wait(10) == 128 + signal.SIGTERM
        assert _gone(prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            runs.remove_run(prefix)


def test_forked_child_exit_leaves_parents_testbed_alone() -> None:
    code = (
        "import os, sys\n"
        "from netns_testbed import runs\n"
        "from netns_testbed.topology import build_lan\n"
        "tb = build_lan()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    tb.teardown()\n"
        "    sys.exit(0)  # runs atexit in the child too\n"
        "os.waitpid(pid, 0)\n"
        "print(tb.prefix, len(runs.namespaces_with_prefix(tb.prefix)), flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    prefix, count = out.stdout.split()
    assert count == "4"
    assert _gone(prefix)  # the parent's own exit did tear down
