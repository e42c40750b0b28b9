"""The communication partner (CN): a separate process that serves one verified stream.

Run inside the CN namespace as its own process so its CPU time and GIL are not the mover's:

    python -m netns_testbed.cnpeer --netns NS --listen ADDR [--port N] --family 6 \\
        --tx-seed S --rx-seed S --rate BYTES_PER_S|sat [--dualstack]

It listens, prints a ready line `{"event": "ready", "port": N, "pid": P}`, accepts one connection
and runs a StreamEndpoint on it. Control is JSON lines on stdin, one reply line each on stdout:

    {"cmd": "stats"}    -> tx, rx, max_rx_gap_ms (the CN stall since the last mark, including a
                           gap still in progress), eof, error, connected, counters
    {"cmd": "mark"}     -> reset the stall tracker
    {"cmd": "counters"} -> the CN namespace's Tcp/TcpExt counters
    {"cmd": "finish", "timeout": 10} -> stop sending, SHUT_WR, wait for the peer's EOF, verify,
                           final totals
    {"cmd": "quit"}     -> exit (also on stdin EOF, so the process dies with its controller)

`CnPeer` is the controlling side's client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
from typing import IO, Any

from netns_testbed.counters import read_tcp_counters
from netns_testbed.stream import StreamEndpoint, StreamError, StreamResult
from sessmob.closing import Closing

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CnPeerError(RuntimeError):
    """The CN peer process failed, refused a command or did not answer in time."""


# --------------------------------------------------------------------------------------------
# The process side


class _Server:
    """State of the CN process: the listener, the accepted connection and its endpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lsock = _listen(args.listen, args.port, args.family, args.dualstack)
        self.port: int = self.lsock.getsockname()[1]
        self.endpoint: StreamEndpoint | None = None
        self.conn: socket.socket | None = None
        self.peer: str | None = None
        self.accept_error: str | None = None
        self.accepted = threading.Event()
        self.result: StreamResult | None = None

    def accept_loop(self) -> None:
        try:
            conn, addr = self.lsock.accept()
            if self.args.nodelay:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ep = StreamEndpoint(
                conn,
                tx_seed=self.args.tx_seed,
                rx_seed=self.args.rx_seed,
                rate=self.args.rate,
                chunk=self.args.chunk,
            )
            self.conn, self.peer = conn, f"{addr[0]}:{addr[1]}"
            ep.start()
            self.endpoint = ep
        except Exception as e:
            self.accept_error = f"accept on port {self.port} failed: {e!r}"
        finally:
            self.accepted.set()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "stats":
            return {**self._stream_fields(), "counters": read_tcp_counters()}
        if cmd == "mark":
            if self.endpoint is not None:
                self.endpoint.mark()
            return {}
        if cmd == "counters":
            return {"counters": read_tcp_counters()}
        if cmd == "finish":
            return self._finish(float(req.get("timeout", 10.0)))
        raise CnPeerError(f"unknown command {cmd!r}")

    def _finish(self, timeout: float) -> dict[str, Any]:
        if self.result is None:
            if not self.accepted.wait(timeout) or self.endpoint is None:
                raise CnPeerError(self.accept_error or "finish: no connection was accepted")
            self.result = self.endpoint.finish(timeout, check=False)
        r = self.result
        return {
            "tx": r.tx_bytes,
            "rx": r.rx_bytes,
            "eof": r.eof,
            "error": r.error,
            "max_rx_gap_ms": r.max_rx_gap_s * 1000.0,
            "elapsed_s": r.elapsed_s,
            "peer": self.peer,
            "counters": read_tcp_counters(),
        }

    def _stream_fields(self) -> dict[str, Any]:
        ep = self.endpoint
        if ep is None:
            return {
                "connected": False,
                "tx": 0,
                "rx": 0,
                "max_rx_gap_ms": 0.0,
                "eof": False,
                "error": self.accept_error,
                "peer": None,
            }
        s = ep.stats
        return {
            "connected": True,
            "tx": s.tx_bytes,
            "rx": s.rx_bytes,
            "max_rx_gap_ms": s.max_rx_gap_s * 1000.0,
            "eof": s.eof,
            "error": s.error,
            "peer": self.peer,
        }

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        for s in (self.conn, self.lsock):
            if s is not None:
                s.close()


def _listen(addr: str, port: int, family: int, dualstack: bool) -> socket.socket:
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        elif dualstack:
            raise CnPeerError("--dualstack needs an IPv6 listener (--family 6)")
        s.bind((addr, port))
        s.listen(1)
    except OSError as e:
        s.close()
        raise CnPeerError(f"cannot listen on [{addr}]:{port} (IPv{family}): {e}") from e
    return s


def _reply(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _parse_rate(text: str) -> float | None:
    if text in ("sat", "saturated", "none"):
        return None
    return float(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m netns_testbed.cnpeer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--netns", help="enter this network namespace first (ip netns name)")
    p.add_argument("--listen", required=True, help="address to bind ('::' for dual-stack)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--family", type=int, choices=(4, 6), required=True)
    p.add_argument("--dualstack", action="store_true", help="IPv6 listener accepting IPv4")
    p.add_argument("--tx-seed", type=int, required=True)
    p.add_argument("--rx-seed", type=int, required=True)
    p.add_argument("--rate", type=_parse_rate, required=True, help="bytes/s, 0 = idle, 'sat'")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--nodelay", action="store_true", help="set TCP_NODELAY on the connection")
    args = p.parse_args(argv)

    out = sys.stdout
    if args.netns:
        from sessmob.netns import open_netns, setns

        fd = open_netns(args.netns)
        setns(fd)  # the main thread, before any other thread exists: the whole process moves
        os.close(fd)
    try:
        server = _Server(args)
    except CnPeerError as e:
        _reply(out, {"event": "error", "error": str(e)})
        return 2
    threading.Thread(target=server.accept_loop, name="cnpeer-accept", daemon=True).start()
    _reply(out, {"event": "ready", "port": server.port, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise CnPeerError(f"command must be a JSON object, got {line.strip()!r}")
                if req.get("cmd") == "quit":
                    _reply(out, {"ok": True})
                    break
                _reply(out, {"ok": True, **server.handle(req)})
            except Exception as e:
                _reply(out, {"ok": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        server.close()
    return 0


# --------------------------------------------------------------------------------------------
# The controlling side


class CnPeer(Closing):
    """Client for a CN peer process running inside a namespace. A context manager."""

    def __init__(self, proc: subprocess.Popen[str], port: int, stderr: IO[str]) -> None:
        self.proc = proc
        self.port = port
        self._stderr = stderr
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._finish_sent = False
        self._finish_reply: dict[str, Any] | None = None

    @classmethod
    def start(
        cls,
        netns: str,
        listen_addr: str,
        port: int = 0,
        *,
        family: int,
        tx_seed: int,
        rx_seed: int,
        rate: float | None,
        dualstack: bool = False,
        chunk: int = 4096,
        nodelay: bool = False,
        timeout: float = 10.0,
    ) -> CnPeer:
        """Spawn the peer inside `netns` (it setns()es itself) and wait until it listens.

        family: socket.AF_INET6/AF_INET (or 6/4). rate: bytes/s, None = saturated, 0 = idle.
        """
        fam = {socket.AF_INET6: 6, socket.AF_INET: 4, 6: 6, 4: 4}.get(family)
        if fam is None:
            raise ValueError(f"family {family}: use socket.AF_INET6 or socket.AF_INET")
        cmd = [
            sys.executable,
            "-m",
            "netns_testbed.cnpeer",
            "--netns",
            netns,
            "--listen",
            listen_addr,
            "--port",
            str(port),
            "--family",
            str(fam),
            "--tx-seed",
            str(tx_seed),
            "--rx-seed",
            str(rx_seed),
            "--rate",
            "sat" if rate is None else repr(float(rate)),
            "--chunk",
            str(chunk),
        ]
        if dualstack:
            cmd.append("--dualstack")
        if nodelay:
            cmd.append("--nodelay")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p
        )
        stderr = tempfile.TemporaryFile(mode="w+", prefix="cnpeer-")  # noqa: SIM115 - owned by the CnPeer
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
            env=env,
            close_fds=True,
        )
        peer = cls(proc, 0, stderr)
        threading.Thread(target=peer._read_stdout, name="cnpeer-reader", daemon=True).start()
        try:
            ready = peer._next(timeout, f"start in netns {netns!r}")
            if ready.get("event") != "ready":
                raise CnPeerError(
                    f"CN peer in netns {netns!r} failed to start: "
                    f"{ready.get('error', ready)}{peer._stderr_tail()}"
                )
            peer.port = int(ready["port"])
        except BaseException:
            peer.close()
            raise
        return peer

    # -- commands -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """tx, rx, max_rx_gap_ms (CN stall since mark), eof, error, connected, counters."""
        return self._request({"cmd": "stats"})

    def mark(self) -> None:
        """Reset the CN stall tracker."""
        self._request({"cmd": "mark"})

    def counters(self) -> dict[str, int]:
        """The CN namespace's Tcp.* / TcpExt.* counters."""
        c: dict[str, int] = self._request({"cmd": "counters"})["counters"]
        return c

    def begin_finish(self, timeout: float = 10.0) -> None:
        """Ask the CN to finish without waiting (so the local end can finish concurrently)."""
        with self._lock:
            if not self._finish_sent:
                self._send({"cmd": "finish", "timeout": timeout})
                self._finish_sent = True

    def finish(self, timeout: float = 10.0) -> dict[str, Any]:
        """Stop sending, SHUT_WR, wait for the peer's EOF; final tx, rx, eof, error, counters.

        The local endpoint must finish concurrently (see finish_pair).
        """
        self.begin_finish(timeout)
        with self._lock:
            if self._finish_reply is None:
                self._finish_reply = self._check(self._next(timeout + 5.0, "finish"), "finish")
            return self._finish_reply

    def close(self) -> None:
        """Ask the process to quit; kill it if it does not exit promptly."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with contextlib.suppress(OSError):
            self._stderr.close()

    # -- plumbing -------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)

    def _send(self, obj: dict[str, Any]) -> None:
        if self.proc.stdin is None or self.proc.poll() is not None:
            raise CnPeerError(f"CN peer (pid {self.proc.pid}) is not running{self._stderr_tail()}")
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise CnPeerError(
                f"CN peer (pid {self.proc.pid}) stdin closed: {e}{self._stderr_tail()}"
            ) from e

    def _next(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise CnPeerError(
                f"CN peer (pid {self.proc.pid}) did not answer {what!r} within "
                f"{timeout:.1f} s{self._stderr_tail()}"
            ) from None
        if line is None:
            self._lines.put(None)  # keep reporting EOF
            raise CnPeerError(
                f"CN peer (pid {self.proc.pid}) exited during {what!r} "
                f"(status {self.proc.poll()}){self._stderr_tail()}"
            )
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise CnPeerError(f"CN peer sent a non-object line: {line.strip()!r}")
        return obj

    def _check(self, reply: dict[str, Any], what: str) -> dict[str, Any]:
        if not reply.get("ok"):
            raise CnPeerError(f"CN peer refused {what!r}: {reply.get('error')}")
        return reply

    def _request(self, obj: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        with self._lock:
            if self._finish_sent and self._finish_reply is None:
                raise CnPeerError(f"{obj['cmd']!r} while a finish is pending: call finish()")
            self._send(obj)
            return self._check(self._next(timeout, obj["cmd"]), obj["cmd"])

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:].strip()
        except (OSError, ValueError):
            return ""
        return f"\n--- CN peer stderr ---\n{tail}" if tail else ""


def finish_pair(
    endpoint: StreamEndpoint, peer: CnPeer, timeout: float = 10.0
) -> tuple[StreamResult, dict[str, Any]]:
    """Finish both ends concurrently and check that each side received what the other sent.

    Raises StreamError naming the side and the numbers when anything is off.
    """
    peer.begin_finish(timeout)
    local = endpoint.finish(timeout, check=False)
    cn = peer.finish(timeout)
    problems = []
    if local.error:
        problems.append(f"local: {local.error}")
    if cn.get("error"):
        problems.append(f"CN: {cn['error']}")
    if not local.eof or not cn.get("eof"):
        problems.append(f"EOF seen: local {local.eof}, CN {cn.get('eof')}")
    if local.tx_bytes != cn["rx"]:
        problems.append(f"local sent {local.tx_bytes} B but CN verified {cn['rx']} B")
    if cn["tx"] != local.rx_bytes:
        problems.append(f"CN sent {cn['tx']} B but local verified {local.rx_bytes} B")
    if problems:
        raise StreamError("verified stream failed: " + "; ".join(problems))
    return local, cn


if __name__ == "__main__":
    sys.exit(main())
