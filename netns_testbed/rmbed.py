"""Relocation Managers on the lan testbed: one `sessmob rm` per device, in its namespace.

Used by the demo, the end-to-end tests and the RM benchmark. Every device gets its own state
directory (the namespaces share one filesystem) and a TOML configuration written here; the
processes run inside the device namespaces and are stopped (SIGTERM, then SIGKILL) on close.
Unix sockets are not bound to a network namespace, so this process reaches every RM's control
socket directly.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from sessmob.closing import Closing
from sessmob.rm.control import ControlClient, ControlError

from .topology import Testbed

R_PORT = 4700
_APP_LOGS: dict[int, str] = {}  # application pid -> its stderr log
DEVICES = ("ed", "id")


@dataclass
class RmBed(Closing):
    """RMs on ed and id of a lan testbed (plus whatever apps the caller starts)."""

    tb: Testbed
    importers: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> [importers]
    extra: dict[str, str] = field(default_factory=dict)  # device -> TOML appended to its config
    limits: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> [limits]
    adapters: dict[str, list[str]] = field(default_factory=dict)  # device -> enabled adapters
    root: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    apps: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix=f"sessmob-{self.tb.prefix}")
        try:
            for dev in DEVICES:
                self._start_rm(dev)
            for dev in DEVICES:
                self._wait_control(dev)
        except BaseException:
            self.close()
            raise

    def start_rm(self, dev: str) -> None:
        """(Re)start `dev`'s RM with the current config (its state dir kept) and wait until
        it answers. The previous process must have ended."""
        old = self.procs.get(dev)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"rm on {dev} is still running")
        self._start_rm(dev)
        self._wait_control(dev)

    def state_dir(self, dev: str) -> str:
        return os.path.join(self.root, dev)

    def config_text(self, dev: str) -> str:
        hosts = self.tb.hosts
        other = "id" if dev == "ed" else "ed"
        lines = [f'device = "{dev}"']
        if dev in self.adapters:
            lines.append("adapters = [" + ", ".join(f'"{a}"' for a in self.adapters[dev]) + "]")
        lines += [
            "[r]",
            f'listen = "{hosts[dev].addr6}"',
            f"port = {R_PORT}",
            "[network]",
            'interface = "eth0"',
            f'pool = ["{self.tb.session_addr6}/{self.tb.session_prefixlen6}", '
            f'"2001:db8:1::101/{self.tb.session_prefixlen6}"]',
            f"[devices.{other}]",
            f'host = "{hosts[other].addr6}"',
            f"port = {R_PORT}",
            "[apps]",
            "allowed_uids = []",
        ]
        limits = {"reservation_timeout": 3.0, "peer_timeout": 2.0, "app_timeout": 2.0}
        limits.update(self.limits.get(dev, {}))
        lines.append("[limits]")
        lines += [f"{k} = {v}" for k, v in limits.items()]
        for typ, spec in self.importers.get(dev, {}).items():
            lines.append(f"[importers.{typ}]")
            cmd = ", ".join(f'"{c}"' for c in spec["command"])
            lines.append(f"command = [{cmd}]")
            if spec.get("user"):
                lines.append(f'user = "{spec["user"]}"')
        return "\n".join(lines) + "\n" + self.extra.get(dev, "")

    def _start_rm(self, dev: str) -> None:
        sd = self.state_dir(dev)
        os.makedirs(sd, exist_ok=True)
        cfg = os.path.join(sd, "rm.toml")
        with open(cfg, "w") as f:
            f.write(self.config_text(dev))
        log = open(os.path.join(sd, "rm.log"), "wb")  # noqa: SIM115 - lives with the process
        self.procs[dev] = self.tb.popen(
            dev,
            [sys.executable, "-m", "sessmob.cli", "rm", "--config", cfg, "--state-dir", sd]
            + (["-v"] if os.environ.get("SESSMOB_RM_VERBOSE") else []),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _wait_control(self, dev: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[dev]
            if proc.poll() is not None:
                raise RuntimeError(f"rm on {dev} exited ({proc.returncode}):\n{self.log(dev)}")
            try:
                self.control(dev).request("device.list")
                return
            except ControlError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rm on {dev} not answering:\n{self.log(dev)}") from None
                time.sleep(0.05)

    def log(self, dev: str) -> str:
        try:
            with open(os.path.join(self.state_dir(dev), "rm.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def control(self, dev: str) -> ControlClient:
        return ControlClient(os.path.join(self.state_dir(dev), "control.sock"))

    def start_app(self, dev: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start an application process inside `dev` (stopped on close). Its stdout is a pipe
        (ready lines, reports); its stderr goes to a file, so a chatty log can never fill a
        pipe nobody reads and stall the application."""
        path = os.path.join(self.root, f"app{len(self.apps)}-{dev}.log")
        with open(path, "wb") as err:
            p = self.tb.popen(dev, argv, stdout=subprocess.PIPE, stderr=err)
        _APP_LOGS[p.pid] = path
        self.apps.append(p)
        return p

    @staticmethod
    def stderr_of(proc: subprocess.Popen[bytes]) -> str:
        """The tail of an application's log (see start_app)."""
        try:
            with open(_APP_LOGS[proc.pid], errors="replace") as f:
                return f.read()[-2000:]
        except (KeyError, OSError):
            return ""

    @staticmethod
    def wait_ready(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> str:
        """Wait for an application's ready line (printed once its RM registered it)."""
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if not line:
            err = RmBed.stderr_of(proc)
            raise RuntimeError(f"application not ready within {timeout}s: {err}")
        return line.decode(errors="replace").strip()

    def start_importer(self, dev: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start an application and return once the RM on `dev` knows it."""
        p = self.start_app(dev, argv)
        self.wait_ready(p)
        return p

    def sessions(self, dev: str) -> list[dict[str, Any]]:
        reply = self.control(dev).request("session.list")
        return list(reply.get("sessions", reply.get("result", [])))

    def wait_session(self, dev: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.sessions(dev)
            if found:
                return found[0]
            time.sleep(0.05)
        raise TimeoutError(f"no session appeared on {dev}:\n{self.log(dev)}")

    def wait_flows(self, dev: str, kind: str, n: int = 1, timeout: float = 10.0) -> None:
        """Until the (first) session on `dev` has `n` flows of `kind` ("tcp" / "udp"): a
        client's connections join it a moment after they are accepted. (The echo server's
        own UDP flow is there from the start, so counting all flows would not do.)"""
        deadline = time.monotonic() + timeout
        while True:
            found = self.sessions(dev)
            have = sum(f["kind"] == kind for f in found[0]["flows"]) if found else 0
            if have >= n:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{have} of {n} {kind} flows joined the session on {dev}:\n{self.log(dev)}"
                )
            time.sleep(0.02)

    def move(self, dev: str, session: str, to: str) -> dict[str, Any]:
        return self.control(dev).request("session.move", session=session, device=to)

    def close(self) -> None:
        for p in [*self.apps, *self.procs.values()]:
            if p.poll() is None:
                p.terminate()
        for p in [*self.apps, *self.procs.values()]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)
