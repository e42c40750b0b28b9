"""Verified bidirectional byte streams: the yardstick for "no byte lost, none duplicated".

Each direction carries a deterministic pattern: the bytes of `random.Random(seed).randbytes(P)`
repeated, with an odd period P of about 8 MiB. Because the bytes are random and P lines up with
no chunk or buffer size, a gap, a duplicate or a corrupted byte anywhere in the stream shows as a
mismatch at a known stream offset. The receiver compares with memcmp (bytearray == memoryview),
so checking costs a few hundredths of a nanosecond per byte.

`StreamEndpoint` runs one end of such a stream on a connected TCP socket in a worker thread
(non-blocking socket, select/poll and an eventfd to wake it) so the measuring tool stays cheap and
can be paused instantly, even while its send buffer is full, for a socket to be migrated.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import select
import socket
import threading
import time
from dataclasses import dataclass

PERIOD = 8_388_593
"""Pattern period in bytes: the largest prime below 8 MiB, so it is odd and aligns with nothing."""

MAX_SLICE = 1 << 20
"""Longest contiguous slice the pattern buffer hands out (it repeats its first MiB at the end)."""

_RECV_SIZE = 256 * 1024
_SAT_CHUNK = 128 * 1024
_FD_SETSIZE = 1024


class StreamError(Exception):
    """A verified stream failed: mismatch, socket error, timeout or misuse."""


class PatternMismatch(StreamError):
    """Received bytes differ from the pattern; `offset` is the first differing stream offset."""

    def __init__(self, offset: int, expected: int, got: int, diagnosis: str) -> None:
        self.offset = offset
        self.expected = expected
        self.got = got
        self.diagnosis = diagnosis
        super().__init__(
            f"stream mismatch at offset {offset}: expected 0x{expected:02x}, got 0x{got:02x}"
            f" ({diagnosis})"
        )


@functools.lru_cache(maxsize=8)
def pattern_buffer(seed: int) -> bytes:
    """The pattern period for `seed` followed by its first MAX_SLICE bytes again.

    Cached per process (built once in ~30 ms): every writer and checker of a seed shares it.
    """
    base = random.Random(seed).randbytes(PERIOD)
    return base + base[:MAX_SLICE]


def pattern_bytes(seed: int, offset: int, n: int) -> bytes:
    """The `n` pattern bytes at stream `offset` (any length; for tests and diagnostics)."""
    buf = pattern_buffer(seed)
    out = bytearray()
    while n > 0:
        pos = offset % PERIOD
        k = min(n, MAX_SLICE)
        out += buf[pos : pos + k]
        offset += k
        n -= k
    return bytes(out)


class PatternWriter:
    """Hands out the next bytes of a pattern; the caller advances by what the socket took."""

    def __init__(self, seed: int, offset: int = 0) -> None:
        self.seed = seed
        self.offset = offset
        self._view = memoryview(pattern_buffer(seed))

    def peek(self, n: int) -> memoryview:
        """The next `n` bytes (n <= MAX_SLICE) without consuming them."""
        if not 0 <= n <= MAX_SLICE:
            raise ValueError(f"chunk of {n} bytes: must be between 0 and {MAX_SLICE}")
        pos = self.offset % PERIOD
        return self._view[pos : pos + n]

    def advance(self, n: int) -> None:
        """Consume `n` bytes (what send() reported as sent)."""
        self.offset += n

    def take(self, n: int) -> memoryview:
        """The next `n` bytes, consumed."""
        view = self.peek(n)
        self.offset += n
        return view


class PatternChecker:
    """Verifies received bytes against a pattern; the first mismatch is kept and re-raised."""

    def __init__(self, seed: int, offset: int = 0) -> None:
        self.seed = seed
        self.offset = offset
        self.error: PatternMismatch | None = None
        self._buf = pattern_buffer(seed)
        self._view = memoryview(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Check `data` as the next bytes of the stream; PatternMismatch on the first bad byte.

        `offset` advances only over verified bytes, so after a mismatch it names the bad byte.
        """
        if self.error is not None:
            raise self.error
        n = len(data)
        if n <= MAX_SLICE:  # one contiguous compare: memcmp via bytearray == memoryview
            pos = self.offset % PERIOD
            whole = data if isinstance(data, bytearray) else bytearray(data)
            if whole == self._view[pos : pos + n]:
                self.offset += n
                return
            self._fail(memoryview(whole), pos)
        mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        i = 0
        while i < n:
            k = min(n - i, MAX_SLICE)
            piece = mv[i : i + k]
            pos = self.offset % PERIOD
            if bytearray(piece) != self._view[pos : pos + k]:
                self._fail(piece, pos)
            self.offset += k
            i += k

    def _fail(self, piece: memoryview, pos: int) -> None:
        expected = self._view[pos : pos + len(piece)]
        i = _first_difference(piece, expected)
        self.offset += i
        diag = _diagnose(self._buf, bytes(piece[i:]), (pos + i) % PERIOD)
        self.error = PatternMismatch(self.offset, expected[i], piece[i], diag)
        raise self.error


def _first_difference(a: memoryview, b: memoryview) -> int:
    """Index of the first differing byte (bisection on memcmp; only runs on failure)."""
    lo, hi = 0, min(len(a), len(b))
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if bytearray(a[lo:mid]) == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    for j in range(lo, hi):
        if a[j] != b[j]:
            return j
    return hi


def _diagnose(buf: bytes, got: bytes, pos: int) -> str:
    """Say whether bytes from `pos` on look like a skip, a repeat or a corruption."""
    if len(got) >= 9 and got[1:33] == buf[pos + 1 : pos + 1 + len(got[1:33])]:
        return "one corrupted byte, stream continues in order"
    needle = got[:32]
    if len(needle) < 12:
        return "too few bytes after the mismatch to tell a gap from a duplicate"
    found = buf.find(needle, 0, PERIOD + len(needle) - 1)
    if found < 0:
        return "bytes not from this pattern: corrupted data or wrong seed"
    delta = (found - pos) % PERIOD
    if delta > PERIOD // 2:
        delta -= PERIOD
    if delta > 0:
        return f"gap: {delta} bytes missing"
    return f"duplicate: {-delta} bytes repeated"


@dataclass(frozen=True)
class StreamStats:
    """A snapshot of one endpoint; `max_rx_gap_s` includes a gap still in progress."""

    tx_bytes: int
    rx_bytes: int
    max_rx_gap_s: float
    eof: bool
    error: str | None
    paused: bool
    running: bool


@dataclass(frozen=True)
class StreamResult:
    """Final totals of a finished endpoint."""

    tx_bytes: int
    rx_bytes: int
    eof: bool
    error: str | None
    max_rx_gap_s: float
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.error is None and self.eof


class StreamEndpoint:
    """One end of a bidirectional verified stream on a connected TCP socket (made non-blocking).

    rate: bytes/s to send; None = saturated (as fast as the socket accepts); 0 = send nothing
    (still receive and verify). Paced sending uses a token bucket and select() timeouts with
    microsecond resolution, so at 10 MB/s with 4 KiB chunks the sends are ~0.4 ms apart. A
    sender paced at sub-millisecond ticks reads on those ticks rather than on every arriving
    segment: each thread wake-up costs ~45 µs of CPU on the test VM, so wake-ups are the cost
    that counts (a bigger `chunk` halves it, at the price of coarser pacing).

    The worker never dies silently: a mismatch, a socket error (RST, EPIPE) or a crash ends it
    and is kept in `stats.error`; finish() raises it. A peer's EOF alone is not an error (the
    peer may finish first); totals are compared across both ends (see cnpeer.finish_pair).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        tx_seed: int,
        rx_seed: int,
        rate: float | None,
        chunk: int = 4096,
    ) -> None:
        if rate is not None and rate < 0:
            raise ValueError(f"rate {rate} B/s: must be >= 0 or None (saturated)")
        if not 0 < chunk <= MAX_SLICE:
            raise ValueError(f"chunk {chunk}: must be between 1 and {MAX_SLICE}")
        sock.setblocking(False)
        self._sock = sock
        self._tx = PatternWriter(tx_seed)
        self._rx = PatternChecker(rx_seed)
        self._rate = rate
        self._chunk = chunk
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cv = threading.Condition()
        self._pause_req = False
        self._parked = False
        self._stop_tx_req = False
        self._abort_req = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._eof = False
        self._gap_lock = threading.Lock()
        self._last_rx = 0.0
        self._max_gap = 0.0
        self._t_start = 0.0
        self._t_end = 0.0

    # -- control (any thread) -------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread; the stream begins at once in both directions."""
        if self._thread is not None:
            raise StreamError("stream endpoint already started")
        self._t_start = self._last_rx = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"stream-fd{self._sock.fileno()}", daemon=True
        )
        self._thread.start()

    def pause(self) -> None:
        """Park the worker; returns once it no longer touches the socket."""
        self._require_started()
        with self._cv:
            self._pause_req = True
            self._wake()
            self._cv.wait_for(lambda: self._parked or self._done.is_set())

    def resume(self) -> None:
        """Let a paused worker continue (on the swapped socket, if any)."""
        with self._cv:
            self._pause_req = False
            self._cv.notify_all()

    def swap_socket(self, sock: socket.socket) -> None:
        """Continue the same stream on `sock` (e.g. the migrated socket); only while paused."""
        with self._cv:
            if not (self._parked or self._done.is_set()):
                raise StreamError("swap_socket() needs a paused endpoint: call pause() first")
            sock.setblocking(False)
            self._sock = sock

    def mark(self) -> None:
        """Reset the max-gap tracker: later stats report the longest gap since now."""
        with self._gap_lock:
            self._max_gap = 0.0
            self._last_rx = time.monotonic()

    def stop_sending(self) -> None:
        """Stop sending and shut down the write side (FIN); keep receiving. Does not wait."""
        self._require_started()
        self._stop_tx_req = True
        self.resume()
        self._wake()

    def finish(self, timeout: float = 10.0, *, check: bool = True) -> StreamResult:
        """Stop sending, SHUT_WR, read until the peer's EOF, and return the verified totals.

        The peer must finish too (concurrently), or this times out. With check=True a recorded
        error (mismatch, reset, timeout) raises StreamError; otherwise it is in the result.
        """
        self.stop_sending()
        if not self._done.wait(timeout):
            self._set_error(
                f"no EOF from peer within {timeout:.1f} s after finish"
                f" (tx {self._tx.offset} B, rx {self._rx.offset} B): did the peer finish too?"
            )
            self.abort()
        assert self._thread is not None
        self._thread.join()
        result = StreamResult(
            tx_bytes=self._tx.offset,
            rx_bytes=self._rx.offset,
            eof=self._eof,
            error=self._error,
            max_rx_gap_s=self._max_gap,
            elapsed_s=self._t_end - self._t_start,
        )
        if check and result.error is not None:
            raise StreamError(result.error)
        return result

    def abort(self) -> None:
        """Stop the worker without FIN (cleanup after a failure); the socket stays open."""
        self._abort_req = True
        with self._cv:
            self._cv.notify_all()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def close(self) -> None:
        """Abort the worker and release the wake-up fd (the socket belongs to the caller)."""
        self.abort()
        if self._wake_fd >= 0 and (self._thread is None or not self._thread.is_alive()):
            os.close(self._wake_fd)
            self._wake_fd = -1

    @property
    def stats(self) -> StreamStats:
        now = time.monotonic()
        with self._gap_lock:
            gap = self._max_gap
            if self._thread is not None and not self._eof and not self._done.is_set():
                gap = max(gap, now - self._last_rx)
        return StreamStats(
            tx_bytes=self._tx.offset,
            rx_bytes=self._rx.offset,
            max_rx_gap_s=gap,
            eof=self._eof,
            error=self._error,
            paused=self._parked,
            running=self._thread is not None and not self._done.is_set(),
        )

    @property
    def socket(self) -> socket.socket:
        return self._sock

    # -- worker ---------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self._thread is None:
            raise StreamError("stream endpoint not started: call start() first")

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # counter saturated: wakes anyway
            os.eventfd_write(self._wake_fd, 1)

    def _set_error(self, msg: str) -> None:
        if self._error is None:
            self._error = msg

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the worker must never die silently
            self._set_error(f"stream worker crashed: {e!r}")
        finally:
            self._t_end = time.monotonic()
            with self._cv:
                self._done.set()
                self._cv.notify_all()

    def _park(self) -> None:
        with self._cv:
            self._parked = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._pause_req or self._abort_req)
            self._parked = False

    def _loop(self) -> None:
        """Send when the token bucket allows, receive whenever data is there, park on request.

        One select() per event: a paced send happens right after the timeout that waited for
        its tokens (the socket is tried optimistically; only after EAGAIN is writability waited
        for), so at 10 MB/s the loop runs about once per chunk sent plus once per read.
        """
        rate = self._rate
        chunk = self._chunk
        bucket = max(4.0 * chunk, (rate or 0.0) * 0.01)  # catch up after a 10 ms hiccup
        tx_open = rate != 0
        tick_rx = rate is not None and rate > 0 and chunk / rate <= 0.001
        tx_shut = False
        w_blocked = False  # last send hit EAGAIN: wait for writability before the next one
        rx_more = False  # last read filled the buffer: more is probably waiting
        rbuf = bytearray(_RECV_SIZE)
        rview = memoryview(rbuf)
        writer, checker = self._tx, self._rx
        wake = self._wake_fd
        tokens = float(chunk)
        monotonic = time.monotonic
        t_last = monotonic()
        sock = self._sock
        fd = sock.fileno()
        use_select = fd < _FD_SETSIZE and wake < _FD_SETSIZE
        r_both, r_wake, w_fd = [fd, wake], [wake], [fd]
        w_none: list[int] = []
        poller: select.poll | None = None
        bad = select.POLLERR | select.POLLHUP

        while True:
            if self._abort_req:
                return
            if self._pause_req:
                self._park()
                sock = self._sock
                fd = sock.fileno()
                use_select = fd < _FD_SETSIZE and wake < _FD_SETSIZE
                r_both, w_fd = [fd, wake], [fd]
                poller = None
                w_blocked = False
                tokens = float(chunk)
                t_last = monotonic()
                continue
            if self._stop_tx_req and not tx_shut:
                tx_open = False
                tx_shut = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError as e:
                    self._set_error(f"shutdown(SHUT_WR) failed after tx {writer.offset} B: {e}")
                    return
                if self._eof:
                    return

            # Send first if allowed, then wait for input, writability or the next tokens.
            timeout: float | None = None
            want_w = False
            if tx_open:
                if rate is not None:
                    now = monotonic()
                    tokens = min(bucket, tokens + (now - t_last) * rate)
                    t_last = now
                if w_blocked:
                    want_w = True
                elif rate is None or tokens >= chunk:
                    n = _SAT_CHUNK if rate is None else min(int(tokens) // chunk, 4) * chunk
                    try:
                        sent = sock.send(writer.peek(n), socket.MSG_NOSIGNAL)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                        w_blocked = want_w = True
                    except OSError as e:
                        self._set_error(_sock_error(sock, "send", e, writer.offset, checker.offset))
                        return
                    writer.advance(sent)
                    if rate is None:
                        timeout = 0.0  # keep sending, but look at input and control first
                    else:
                        tokens -= sent
                if rate is not None and not w_blocked:
                    timeout = 0.0 if tokens >= chunk else (chunk - tokens) / rate
            want_r = not self._eof
            # Fast paced sender: read on its own ticks (< 1 ms apart) instead of waking for
            # every arriving segment. Halves the wake-ups, and a wake-up costs ~40 µs of CPU here.
            poll_r = want_r and (rx_more or not (tick_rx and timeout is not None and timeout > 0))

            if use_select:
                rl, wl, _ = select.select(
                    r_both if poll_r else r_wake, w_fd if want_w else w_none, w_none, timeout
                )
                readable = want_r and (fd in rl or not poll_r)
                woken = wake in rl
                if wl:
                    w_blocked = False
            else:  # fds beyond select()'s range: poll, at millisecond timeout resolution
                if poller is None:
                    poller = select.poll()
                    poller.register(wake, select.POLLIN)
                mask = (select.POLLIN if poll_r else 0) | (select.POLLOUT if want_w else 0)
                if mask:
                    poller.register(fd, mask)
                else:  # ERR/HUP are reported even for an empty mask: don't spin on them
                    with contextlib.suppress(KeyError):
                        poller.unregister(fd)
                ms = None if timeout is None else int(timeout * 1000 + 0.999)
                readable = want_r and not poll_r
                woken = False
                for pfd, ev in poller.poll(ms):
                    if pfd == wake:
                        woken = True
                    else:
                        readable = readable or (want_r and bool(ev & (select.POLLIN | bad)))
                        if want_w and ev & (select.POLLOUT | bad):
                            w_blocked = False

            if woken:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(wake)

            rx_more = False
            if readable:
                try:
                    n = sock.recv_into(rbuf)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    self._set_error(_sock_error(sock, "recv", e, writer.offset, checker.offset))
                    return
                if n == 0:
                    self._eof = True  # keep sending until finish; then FIN and stop
                    if tx_shut:
                        return
                    continue
                try:
                    checker.feed(rview[:n])
                except PatternMismatch as e:
                    self._set_error(str(e))
                    return
                now = monotonic()
                with self._gap_lock:
                    gap = now - self._last_rx
                    if gap > self._max_gap:
                        self._max_gap = gap
                    self._last_rx = now
                rx_more = n == _RECV_SIZE


def _sock_error(sock: socket.socket, op: str, e: OSError, tx: int, rx: int) -> str:
    """Describe a socket failure; a send after an RST says EPIPE, so ask SO_ERROR for the cause."""
    code = e.errno or 0
    if code == errno.EPIPE:
        with contextlib.suppress(OSError):
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or code
    what = {
        errno.ECONNRESET: "connection reset by peer (RST)",
        errno.EPIPE: "broken pipe (peer closed)",
        errno.ETIMEDOUT: "connection timed out",
    }.get(code, os.strerror(code) if code else str(e))
    return f"{op} failed after tx {tx} B / rx {rx} B: {what} [errno {code}]"
