"""Enter a network namespace from the current thread.

One process can play several devices: `setns(2)` with CLONE_NEWNET switches only the calling
thread, and a socket keeps the namespace it was created in for its whole life. So the pattern is
"enter, create the socket, leave" — afterwards the socket can be used from any thread.

Namespaces are named as `ip netns` names them (bind mounts under /run/netns).
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(OSError):
    """Entering or opening a network namespace failed."""


def netns_path(name: str) -> str:
    """Path of the bind mount `ip netns` uses for namespace `name`."""
    if not name or "/" in name or name in (".", ".."):
        raise NetnsError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def open_netns(name: str) -> int:
    """Open namespace `name` and return an fd (O_CLOEXEC) usable with setns()."""
    path = netns_path(name)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(
            e.errno, f"cannot open network namespace {name!r} ({path}): {e.strerror}"
        ) from e


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace referred to by `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


@contextmanager
def entered(name_or_fd: str | int) -> Iterator[None]:
    """Run the block with the current thread inside another network namespace.

    Accepts a namespace name or an fd from open_netns(). The thread's original namespace is
    restored on exit, also when the block raises.
    """
    target = open_netns(name_or_fd) if isinstance(name_or_fd, str) else name_or_fd
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if isinstance(name_or_fd, str):
            os.close(target)
        raise
    try:
        setns(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)
        if isinstance(name_or_fd, str):
            os.close(target)


def socket_in(
    name_or_fd: str | int,
    family: int = socket.AF_INET6,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """Create a socket that lives in another network namespace."""
    with entered(name_or_fd):
        return socket.socket(family, type, proto)
