"""activate() tells the peer the restored receive window at once.

The case it exists for: the exporting device's application frees its receive buffer after the
flow was isolated, so the kernel's window update never reaches the CN. The CN still believes
the window is zero and waits for its persist timer (~150 ms here). The restored socket believes it
advertised the open window; the ACK sent by activate() corrects the CN's view immediately.
The control leaves repair mode without that ACK and must stall.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from netns_testbed.rawmove import RawMover
from netns_testbed.topology import Testbed
from sessmob import netns, tcp_repair


def _zero_window_then_move(lan: Testbed, with_ack: bool) -> float:
    """Return how long the CN's blocked sender waits after the move completes."""
    mover = RawMover(lan, socket.AF_INET6)
    cn_addr = lan.hosts["cn"].addr6
    try:
        mover.place("ed")
        mover.prepare("id")
        listener = netns.socket_in(lan.ns("cn"), socket.AF_INET6)
        listener.bind((cn_addr, 0))
        listener.listen()
        ed = netns.socket_in(lan.ns("ed"), socket.AF_INET6)
        ed.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        ed.bind((mover.addr, 0))
        ed.connect((cn_addr, listener.getsockname()[1]))
        cn, _ = listener.accept()
        cn.setblocking(False)
        chunk = b"z" * 65536
        sent = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # fill ed's buffer until its window is zero
            try:
                sent += cn.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    sent += cn.send(chunk)
                except BlockingIOError:
                    break
        # Isolate, then let the application read: the window update it causes is dropped.
        ed_dev, id_dev = mover.devices["ed"], mover.devices["id"]
        ed_dev.addr.delete()
        ed.setblocking(False)
        got = 0
        try:
            while True:
                data = ed.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        except BlockingIOError:
            pass
        assert got > 0
        tcp_repair.freeze(ed)
        snap = tcp_repair.dump(ed)
        id_dev.addr.add()
        with netns.entered(lan.ns("id")):
            new = tcp_repair.restore(snap)
        if with_ack:
            tcp_repair.activate(new, id_dev.acks)
        else:
            tcp_repair.resume(new)  # repair off only: the kernel's old-sequence window probe
        id_dev.announcer.send()
        tcp_repair.release(ed)
        # How long until the CN may send again?
        resumed = threading.Event()
        start = time.monotonic()

        def reader() -> None:
            new.settimeout(3)
            try:
                while not resumed.is_set():
                    if not new.recv(1 << 20):
                        return
            except OSError:
                return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        waited = 3.0
        while time.monotonic() - start < 3:
            try:
                cn.send(chunk)
                waited = time.monotonic() - start
                break
            except BlockingIOError:
                time.sleep(0.001)
        resumed.set()
        t.join(5)
        for s in (new, cn, listener):
            s.close()
        id_dev.addr.delete()
        return waited
    finally:
        mover.close()


def test_window_ack_unblocks_peer_at_once(fresh_lan: Testbed) -> None:
    assert _zero_window_then_move(fresh_lan, with_ack=True) < 0.03


def test_control_without_ack_waits_for_persist_timer(fresh_lan: Testbed) -> None:
    waited = _zero_window_then_move(fresh_lan, with_ack=False)
    if waited < 0.1:
        pytest.fail(f"control did not stall ({waited * 1e3:.0f} ms): the scenario tests nothing")
