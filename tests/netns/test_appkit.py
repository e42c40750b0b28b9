"""The echo application moved with real TCP repair, driven through the application protocol.

Two AppServers (with fake SessionHosts) play the RMs of two devices, two EchoServers the
application on each, and a verifying echo client the CN — all in one private network
namespace, so the "move" is: suspend the exporter, isolate (a drop-all socket filter), freeze
and dump, close the old sockets silently, restore, hand the restored sockets (still in repair
mode) and the state blob to the importer, activate, resume it. In one namespace the old
sockets must be gone before the new ones exist, so the exporter is shut down before the
import (the RM orders it the other way round across devices). The client keeps sending the
whole time and must get every byte back, in order, with no reset.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessmob import netns, tcp_repair
from sessmob.apps.echo import EchoServer, _parse_state, run_client
from sessmob.session import Flow, FlowKind, ServiceSession
from tests.unit.test_appkit import Device, LoopThread

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27
_libc = ctypes.CDLL(None, use_errno=True)
_DROP_PROG = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # ret #0


@pytest.fixture(autouse=True)
def private_netns() -> Iterator[None]:
    """The test thread (and every thread it starts) in a fresh namespace with loopback up."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            pytest.skip(f"cannot create a network namespace: {os.strerror(ctypes.get_errno())}")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
                flags = struct.unpack_from("H", ifr, 16)[0]
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
            yield
        finally:
            netns.setns(home)
    finally:
        os.close(home)


def drop_all(s: socket.socket) -> None:
    """Isolate a flow: drop every segment arriving at it before TCP sees it."""
    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(_DROP_PROG))
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def tcp_counters() -> dict[str, int]:
    with open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))


def move(
    lt: LoopThread,
    src: Device,
    src_app: str,
    dst: Device,
    dst_app: str,
    session: ServiceSession,
    dst_echo: EchoServer,
    listeners: list[socket.socket],
) -> ServiceSession:
    """Move `session` from src to dst; returns the session object on dst.

    `listeners` are isolated too: while neither socket exists, a segment of the flow would
    reach the echo listener on the same port and be answered with a RST (across devices the
    address is simply gone then).
    """
    sid = session.session_id
    state = lt.run(src.server.suspend(src_app, sid))
    tcp = [f for f in session.flows if f.kind is FlowKind.TCP and f.sock is not None]
    udp = [f for f in session.flows if f.kind is FlowKind.UDP and f.sock is not None]
    socks = [f.sock for f in tcp if f.sock is not None]
    for s in [*socks, *listeners]:
        drop_all(s)
    tcp_repair.freeze_many(socks)  # type: ignore[arg-type]
    snaps = tcp_repair.dump_many(socks)  # type: ignore[arg-type]
    udp_local = [(f.flow_id, f.sock.family, f.sock.getsockname()[:2]) for f in udp if f.sock]

    # One namespace: the old sockets go (silently, in repair mode) before the new ones exist.
    tcp_repair.release_many(socks)  # type: ignore[arg-type]
    for f in udp:
        if f.sock is not None:
            f.sock.close()
    lt.run(src.server.shutdown(src_app, sid))
    src.host.sessions.pop(sid, None)

    restored = tcp_repair.restore_many(snaps)
    arriving = ServiceSession(sid, session.session_type, list(session.addresses))
    arriving.flows = [
        Flow(f.flow_id, FlowKind.TCP, s, snap.local, snap.remote)
        for f, s, snap in zip(tcp, restored, snaps, strict=True)
    ]
    for fid, fam, local in udp_local:
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.bind(local)
        arriving.flows.append(Flow(fid, FlowKind.UDP, u, local))
    dst.host.sessions[sid] = arriving
    lt.run(dst.server.import_session(dst_app, arriving, state))
    arriving.app_id = dst_app

    # The importer holds the state but has not touched the sockets yet.
    saved = _parse_state(state)
    adopted = dst_echo.sessions[sid].stats()
    assert adopted["flows"] == {fid: st["echoed"] for fid, st in saved.items()}

    tcp_repair.activate_many(restored)  # type: ignore[arg-type]
    for s in listeners:
        s.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    lt.run(dst.server.resume(dst_app, sid))
    return arriving


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"], ids=["v4mapped", "ipv6"])
def test_echo_session_moves_back_and_forth_while_the_client_sends(
    tmp_path: Path, addr: str
) -> None:
    lt = LoopThread()
    ed = Device(lt, tmp_path / "ed.sock", "ed")
    id_ = Device(lt, tmp_path / "id.sock", "id")
    ed.host.addr = id_.host.addr = addr
    prefix = 32 if ":" not in addr else 128
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    ed_echo = EchoServer(str(ed.path), port)
    id_echo = EchoServer(str(id_.path), port, create_session=False)  # listener: ED has it
    report: dict[str, Any] = {}
    stop = threading.Event()
    try:
        ed_echo.start()
        id_echo.start()
        assert ed_echo.session is not None and ed_echo.kit and id_echo.kit
        sid = ed_echo.session.session_id
        assert ed_echo.session.addresses == [f"{addr}/{prefix}"]
        before = tcp_counters()

        def client() -> None:
            report.update(
                run_client(addr, port, rate=1_000_000, duration=None, tcp=2, udp=1, stop=stop)
            )

        t = threading.Thread(target=client)
        t.start()
        session = ed.host.sessions[sid]
        assert session.flows[0].kind is FlowKind.UDP
        deadline = time.monotonic() + 5
        while len(session.flows) < 3:  # the client's two connections joined the session
            assert time.monotonic() < deadline, "client connections not added to the session"
            time.sleep(0.01)
        ends = [(ed, ed_echo), (id_, id_echo)]
        for i in range(6):
            (src, _), (dst, dst_echo) = ends[i % 2], ends[(i + 1) % 2]
            time.sleep(0.3)
            src_app = src.server.session_app(sid)
            dst_app = dst.server.importer_for("echo")
            assert src_app and dst_app
            listeners = [x._listener for x in (ed_echo, id_echo) if x._listener is not None]
            session = move(lt, src, src_app, dst, dst_app, session, dst_echo, listeners)
        time.sleep(0.5)
        stop.set()
        t.join(60)
        assert report, "client did not finish"
        assert report["ok"], report["errors"]
        tcp_rep = report["tcp"]
        assert all(r["eof"] and r["tx_bytes"] == r["rx_bytes"] > 500_000 for r in tcp_rep)
        assert report["udp"][0]["received"] > 0 and report["udp"][0]["corrupt"] == 0
        after = tcp_counters()
        assert after["OutRsts"] == before["OutRsts"], "a RST was sent"
    finally:
        stop.set()
        for srv in (ed_echo, id_echo):
            srv.stop()
        ed.close()
        id_.close()
        lt.close()
