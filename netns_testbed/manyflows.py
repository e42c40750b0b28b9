"""Many small verified streams on one session address, moved together.

A browser or a game holds hundreds of connections; they move as one session. Here N
connections run from the session address on ed to a listener in the CN namespace (the
kernel's own TCP on both ends). One driver thread per side trickles pattern bytes into a
rotating share of the connections and verifies everything it reads, so every connection
has small queues and traffic in flight when the session moves. The device-side driver is
paused while its sockets move, then continues on the restored ones.

Each connection checks its own stream: both directions use one pattern seed, but every
connection starts at its own offset, so bytes delivered to the wrong connection show up as
a mismatch just like a gap or a duplicate.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import selectors
import socket
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass

from sessmob.closing import Closing
from sessmob.netns import socket_in

from .rawmove import MoveTiming, RawMover
from .stream import PatternChecker, PatternWriter
from .topology import Testbed

SEED_UP, SEED_DOWN = 11, 12  # device -> CN, CN -> device
OFFSET_STRIDE = 104_729  # a prime: every connection starts elsewhere in the pattern


@dataclass
class SideTotals:
    tx: list[int]
    rx: list[int]
    eof: list[bool]
    error: str | None


class _Driver:
    """Sends small chunks round-robin and verifies reads on one side's sockets."""

    def __init__(
        self, socks: list[socket.socket], tx_seed: int, rx_seed: int, chunk: int, per_tick: int
    ) -> None:
        n = len(socks)
        self.socks = socks
        self.tx = [PatternWriter(tx_seed, i * OFFSET_STRIDE) for i in range(n)]
        self.rx = [PatternChecker(rx_seed, i * OFFSET_STRIDE) for i in range(n)]
        self.tx_start = [w.offset for w in self.tx]
        self.rx_start = [c.offset for c in self.rx]
        self.eof = [False] * n
        self.chunk = chunk
        self.per_tick = per_tick
        self.error: str | None = None
        self.sending = True
        self._cv = threading.Condition()
        self._pause = False
        self._parked = False
        self._stop = False
        self._next = 0
        self._thread = threading.Thread(target=self._run, name="manyflows", daemon=True)

    def start(self) -> None:
        for s in self.socks:
            s.setblocking(False)
        self._thread.start()

    def pause(self) -> None:
        with self._cv:
            self._pause = True
            while not self._parked and self._thread.is_alive():
                self._cv.wait(0.05)

    def resume(self, socks: list[socket.socket] | None = None) -> None:
        with self._cv:
            if socks is not None:
                for s in socks:
                    s.setblocking(False)
                self.socks = socks
            self._pause = False
            self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._pause = False
            self._cv.notify_all()
        self._thread.join(10)

    def totals(self) -> SideTotals:
        return SideTotals(
            tx=[w.offset - s for w, s in zip(self.tx, self.tx_start, strict=True)],
            rx=[c.offset - s for c, s in zip(self.rx, self.rx_start, strict=True)],
            eof=list(self.eof),
            error=self.error,
        )

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # recorded, surfaced by the controller
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self._cv:
                self._parked = True
                self._cv.notify_all()

    def _loop(self) -> None:
        sel: selectors.BaseSelector | None = None
        while True:
            with self._cv:
                if self._pause:
                    self._parked = True
                    self._cv.notify_all()
                    if sel is not None:
                        sel.close()
                        sel = None
                    while self._pause:
                        self._cv.wait()
                    self._parked = False
                if self._stop:
                    return
            if sel is None:
                sel = selectors.DefaultSelector()
                for i, s in enumerate(self.socks):
                    sel.register(s, selectors.EVENT_READ, i)
            if self.sending:
                self._send_some()
            for key, _ in sel.select(0.002):
                self._read(key.data)

    def _send_some(self) -> None:
        n = len(self.socks)
        for _ in range(min(self.per_tick, n)):
            i = self._next
            self._next = (i + 1) % n
            w = self.tx[i]
            try:
                sent = self.socks[i].send(w.peek(self.chunk))
            except BlockingIOError:
                continue
            w.advance(sent)

    def _read(self, i: int) -> None:
        try:
            data = self.socks[i].recv(65536)
        except BlockingIOError:
            return
        if not data:
            self.eof[i] = True
            return
        self.rx[i].feed(data)


def _close_side(d: _Driver, timeout: float) -> SideTotals:
    """Stop sending, FIN every connection, read until every peer's FIN; this side's totals."""
    d.pause()
    d.sending = False
    for s in d.socks:
        s.shutdown(socket.SHUT_WR)
    d.resume()
    deadline = time.monotonic() + timeout
    while not all(d.eof) and not d.error and time.monotonic() < deadline:
        time.sleep(0.01)
    d.stop()
    return d.totals()


def serve(netns_name: str, addr: str, n: int, family: int) -> int:
    """The CN side as its own process (own GIL): accept n connections, drive them, and on
    'finish' on stdin close them and print this side's totals as JSON."""
    from sessmob.netns import entered

    with entered(netns_name):
        listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((addr, 0))
    listener.listen(n)
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    socks = [listener.accept()[0] for _ in range(n)]
    listener.close()
    d = _Driver(socks, SEED_DOWN, SEED_UP, 64, max(1, n // 25))
    d.start()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "finish":
            t = _close_side(d, 20.0)
            print(json.dumps(t.__dict__), flush=True)
            break
    d.stop()
    return 0


class ManyFlows(Closing):
    """N verified connections on the session address, moved together between ed and id.

    The CN side runs in its own process, so its work does not compete with the move for
    this process's interpreter lock.
    """

    def __init__(self, tb: Testbed, n: int, family: int = socket.AF_INET6) -> None:
        self.tb = tb
        self.n = n
        self.where = "ed"
        self.timings: list[MoveTiming] = []
        self.device: _Driver | None = None
        self.proc: subprocess.Popen[str] | None = None
        self.mover = RawMover(tb, family)
        try:
            cn_addr = tb.hosts["cn"].addr6 if family == socket.AF_INET6 else tb.hosts["cn"].addr4
            self.mover.place("ed")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "netns_testbed.manyflows", tb.ns("cn"), cn_addr, str(n),
                 str(int(family))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            port = json.loads(self._line())["port"]
            socks = []
            for _ in range(n):
                s = socket_in(tb.ns("ed"), family)
                s.bind((self.mover.addr, 0))
                s.connect((cn_addr, port))
                socks.append(s)
            self._line()  # ready
            self.device = _Driver(socks, SEED_UP, SEED_DOWN, 64, max(1, n // 25))
            self.device.start()
        except BaseException:
            self.close()
            raise

    def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"CN flow process exited ({self.proc.poll()})")
        return line

    def move(self, hold: float = 0.0) -> MoveTiming:
        """Move every connection to the other device. `hold`: seconds the device side stops
        reading before the move, so that data queues up (an application that is behind) —
        and, if nothing has arrived by then (the CN's process was not scheduled: a busy
        host), until something has, for at most a second more."""
        assert self.device is not None
        dst = "id" if self.where == "ed" else "ed"
        self.mover.prepare(dst)
        self.device.pause()
        if hold:
            time.sleep(hold)
            deadline = time.monotonic() + 1.0
            while not _anything_queued(self.device.socks) and time.monotonic() < deadline:
                time.sleep(0.01)
        try:
            new, timing = self.mover.move_many(self.device.socks, self.where, dst)
        except BaseException:
            self.device.resume()
            raise
        self.device.resume(new)
        self.where = dst
        self.timings.append(timing)
        return timing

    def finish(self, timeout: float = 20.0) -> tuple[SideTotals, SideTotals]:
        """Close every connection both ways and read to EOF; both sides' totals."""
        assert self.device is not None and self.proc is not None and self.proc.stdin
        self.proc.stdin.write("finish\n")
        self.proc.stdin.flush()
        dev = _close_side(self.device, timeout)
        cn = SideTotals(**json.loads(self._line()))
        return dev, cn

    @staticmethod
    def check(dev: SideTotals, cn: SideTotals) -> list[str]:
        """Problems found: errors, missing EOFs, and any connection whose bytes differ."""
        problems = [f"device: {dev.error}"] if dev.error else []
        problems += [f"CN: {cn.error}"] if cn.error else []
        for i in range(len(dev.tx)):
            if dev.tx[i] != cn.rx[i] or cn.tx[i] != dev.rx[i]:
                problems.append(
                    f"connection {i}: device sent {dev.tx[i]} CN got {cn.rx[i]}; "
                    f"CN sent {cn.tx[i]} device got {dev.rx[i]}"
                )
            if not (dev.eof[i] and cn.eof[i]):
                problems.append(f"connection {i}: EOF device {dev.eof[i]} CN {cn.eof[i]}")
        return problems

    def close(self) -> None:
        if self.device is not None:
            self.device.stop()
            for s in self.device.socks:
                s.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        dev = self.mover.devices.get(self.where)
        if dev is not None:
            with contextlib.suppress(OSError):
                dev.addr.delete()
        self.mover.close()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))


def _anything_queued(socks: list[socket.socket]) -> bool:
    """Some socket has received bytes nobody has read yet (FIONREAD)."""
    buf = bytearray(4)
    for sock in socks:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        if int.from_bytes(buf, sys.byteorder):
            return True
    return False
