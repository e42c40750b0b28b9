"""Interface U: the controller (the `sessmob` command) talks to the local RM.

A unix stream socket (``<state-dir>/control.sock``, mode 0660) carrying one JSON object per
line each way. Request ``{"cmd": "session.move", "args": {"session": "s1", "device": "id"}}``;
reply ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": {"kind": ..., "message":
..., ...}}``. A connection may carry several requests, answered in order. The caller is checked
with SO_PEERCRED: root and the configured uids only. docs/protocols.md lists every command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a request is a few hundred bytes
MAX_REPLY = 64 << 20  # a reply may list many sessions with many flows
SOCKET_MODE = 0o660
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the terminating NUL

# error kinds in replies (the CLI maps them to exit codes)
BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
MOVE_FAILED = "move_failed"
DENIED = "denied"
INTERNAL = "internal"


class ControlHandler(Protocol):
    """What the RM daemon offers its controller."""

    async def session_list(self) -> list[dict[str, Any]]:
        """Summaries of the sessions this RM knows (ServiceSession.summary())."""
        ...

    async def session_show(self, session_id: str) -> dict[str, Any]:
        """One session's summary; KeyError if there is no such session."""
        ...

    async def session_move(self, session_id: str, device: str) -> dict[str, Any]:
        """Move it; the timeline on success, MoveError (or KeyError) on failure."""
        ...

    async def device_list(self) -> list[dict[str, Any]]:
        """The devices sessions can move to."""
        ...


class MoveError(RuntimeError):
    """A move failed at `step` for `reason`; `timeline` holds the steps done so far."""

    def __init__(self, step: str, reason: str, timeline: dict[str, Any] | None = None) -> None:
        self.step = step
        self.reason = reason
        self.timeline = timeline or {}
        super().__init__(f"move failed at {step}: {reason}")


class ControlError(RuntimeError):
    """An error reply from the RM, or no RM to ask. `kind` says which (see the constants)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str = INTERNAL,
        step: str | None = None,
        reason: str | None = None,
        timeline: dict[str, Any] | None = None,
    ) -> None:
        self.message = message
        self.kind = kind
        self.step = step
        self.reason = reason
        self.timeline = timeline or {}
        super().__init__(message)


class ControlUnreachable(ControlError):
    """No RM answers on the control socket (absent, refused, or no permission)."""


class Credentials(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> Credentials:
    """The kernel's word on who is at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Credentials(pid, uid, gid)


def uid_allowed(uid: int, allowed_uids: set[int]) -> bool:
    """Root may always control the RM; anyone else must be listed."""
    return uid == 0 or uid in allowed_uids


def _fail(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"kind": kind, "message": message, **extra}}


def _str_arg(args: dict[str, Any], name: str, cmd: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"{cmd} needs {name!r} (a non-empty string)")
    return value


class _BadRequest(Exception):
    pass


class ControlServer:
    """Serves interface U on a unix socket for one RM."""

    def __init__(self, path: str, handler: ControlHandler, *, allowed_uids: set[int]) -> None:
        self.path = path
        self.handler = handler
        self.allowed_uids = set(allowed_uids)
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._commands: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "session.list": self._session_list,
            "session.show": self._session_show,
            "session.move": self._session_move,
            "device.list": self._device_list,
        }

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) with mode 0660 from the first instant."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        if len(os.fsencode(tmp)) > _SUN_PATH_MAX:
            raise OSError(
                f"control socket path {self.path!r} is too long for a unix socket (with the "
                f"temporary suffix {len(os.fsencode(tmp))} bytes, max {_SUN_PATH_MAX}): use a "
                "shorter --state-dir"
            )
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._refuse_if_live()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            # Bound under a temporary name, chmod-ed, then renamed: the socket is never
            # reachable with the umask's mode.
            os.chmod(tmp, SOCKET_MODE)
            sock.listen(16)
            os.rename(tmp, self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=MAX_LINE
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        log.info("interface U on %s", self.path)

    def _refuse_if_live(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                f"{self.path} exists and is not a socket; remove it or use another --state-dir"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(self.path)
        except OSError:
            return  # stale: nobody listens; start() replaces it
        finally:
            probe.close()
        raise FileExistsError(
            f"another relocation manager already serves {self.path}; stop it or use another "
            "--state-dir"
        )

    async def close(self) -> None:
        """Stop serving, drop connected controllers and remove the socket file if still ours."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None
        if self._inode is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._inode = None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            cred = peer_credentials(writer.get_extra_info("socket"))
            if not uid_allowed(cred.uid, self.allowed_uids):
                log.warning("controller pid %d uid %d refused", cred.pid, cred.uid)
                # Take its request first: closing on unread data would reset the connection
                # and the caller would see a broken pipe instead of the reason.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.readline(), 1.0)
                await self._send(
                    writer,
                    _fail(
                        DENIED,
                        f"permission denied: uid {cred.uid} may not control this relocation "
                        "manager (run as root or add the uid to allowed_uids in its config)",
                    ),
                )
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, _fail(BAD_REQUEST, f"request over {MAX_LINE} bytes"))
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                reply = await self._dispatch(line)
                await self._send(writer, reply)
        except (ConnectionError, BrokenPipeError):
            pass
        except Exception:
            log.exception("control connection failed")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        try:
            data = json.dumps(reply, allow_nan=False)
        except (TypeError, ValueError) as e:
            log.error("reply is not JSON-able (%s): %r", e, reply)
            data = json.dumps(_fail(INTERNAL, f"internal error: reply is not JSON-able: {e}"))
        writer.write(data.encode() + b"\n")
        await writer.drain()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except ValueError as e:  # UnicodeDecodeError is one too
            return _fail(BAD_REQUEST, f"malformed JSON request: {e}")
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return _fail(BAD_REQUEST, 'a request is a JSON object with a string "cmd"')
        cmd = req["cmd"]
        args = req.get("args", {})
        if not isinstance(args, dict):
            return _fail(BAD_REQUEST, f'{cmd}: "args" must be a JSON object')
        fn = self._commands.get(cmd)
        if fn is None:
            known = ", ".join(sorted(self._commands))
            return _fail(BAD_REQUEST, f"unknown command {cmd!r} (known: {known})")
        try:
            return {"ok": True, "result": await fn(args)}
        except _BadRequest as e:
            return _fail(BAD_REQUEST, str(e))
        except MoveError as e:
            return _fail(MOVE_FAILED, str(e), step=e.step, reason=e.reason, timeline=e.timeline)
        except KeyError as e:
            return _fail(NOT_FOUND, _not_found(e, args))
        except Exception as e:
            log.exception("control command %s failed", cmd)
            return _fail(
                INTERNAL, f"internal error in the relocation manager: {type(e).__name__}: {e}"
            )

    async def _session_list(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"sessions": await self.handler.session_list()}

    async def _session_show(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.handler.session_show(_str_arg(args, "session", "session.show"))

    async def _session_move(self, args: dict[str, Any]) -> dict[str, Any]:
        session = _str_arg(args, "session", "session.move")
        device = _str_arg(args, "device", "session.move")
        return await self.handler.session_move(session, device)

    async def _device_list(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"devices": await self.handler.device_list()}


def _not_found(e: KeyError, args: dict[str, Any]) -> str:
    what = e.args[0] if len(e.args) == 1 else None
    if what is not None and what == args.get("session"):
        return f"no such session: {what}"
    if what is not None and what == args.get("device"):
        return f"no such device: {what}"
    if isinstance(what, str) and " " in what:
        return what  # the handler's own sentence
    return f"no such session: {args['session']}" if "session" in args else f"not found: {what}"


class ControlClient:
    """The controller's side: one blocking request per connection."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Run `cmd` on the RM; its result, or ControlError / ControlUnreachable."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                state_dir = os.path.dirname(self.path) or "."
                raise ControlUnreachable(
                    f"no relocation manager at {self.path} ({e.strerror}); start one with "
                    f"`sessmob rm --config FILE --state-dir {state_dir}`, or point --state-dir "
                    "(or SESSMOB_STATE_DIR) at the state directory of the one that runs",
                    kind="unreachable",
                ) from None
            except PermissionError:
                raise ControlUnreachable(
                    f"permission denied on {self.path}: run as root or as a user in the "
                    "RM's group and allowed_uids",
                    kind=DENIED,
                ) from None
            except OSError as e:
                raise ControlUnreachable(
                    f"cannot connect to {self.path}: {e}", kind="unreachable"
                ) from None
            # The RM may hang up early (e.g. refusing us): its reason may still be readable.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            with sock.makefile("rb") as f:
                line = f.readline(MAX_REPLY)
        except TimeoutError:
            raise ControlError(
                f"no reply from the relocation manager within {self.timeout:g} s "
                "(a move may still be in progress: check `sessmob session list`)",
                kind="timeout",
            ) from None
        except OSError as e:
            raise ControlError(f"control connection failed: {e}", kind="unreachable") from None
        finally:
            sock.close()
        if not line:
            raise ControlError(
                "the relocation manager closed the connection without a reply", kind=INTERNAL
            )
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise ControlError(f"malformed reply from the relocation manager: {e}") from None
        if not isinstance(reply, dict):
            raise ControlError("malformed reply from the relocation manager: not an object")
        if reply.get("ok") is True:
            result = reply.get("result")
            if not isinstance(result, dict):
                raise ControlError("malformed reply from the relocation manager: no result")
            return result
        err = reply.get("error")
        if not isinstance(err, dict):
            raise ControlError("malformed error reply from the relocation manager")
        kind = str(err.get("kind", INTERNAL))
        cls = ControlUnreachable if kind == DENIED else ControlError
        timeline = err.get("timeline")
        raise cls(
            str(err.get("message", "unknown error")),
            kind=kind,
            step=err.get("step"),
            reason=err.get("reason"),
            timeline=timeline if isinstance(timeline, dict) else None,
        )
