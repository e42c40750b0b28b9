"""Accepting connections on an asyncio loop without spinning when accept() keeps failing."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

__all__ = ["ACCEPT_BACKOFF", "accept_failed"]

ACCEPT_BACKOFF = 1.0  # seconds without accepting after the process or system ran out of something
_OUT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def accept_failed(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    on_readable: Callable[[], None],
    err: OSError,
    log: logging.Logger,
    what: str,
) -> None:
    """Handle an accept() error on listening `sock`, watched with `loop.add_reader`.

    Out of descriptors or memory, the pending connection stays queued and the socket stays
    readable: the loop would call again at once, for ever, logging each time. So the listener
    pauses for ACCEPT_BACKOFF seconds (as asyncio's own servers do); other errors concern one
    connection only and are just logged."""
    if err.errno in _OUT_OF:
        log.error("%s: accept failed (%s); not accepting for %g s", what, err, ACCEPT_BACKOFF)
        loop.remove_reader(sock.fileno())
        loop.call_later(ACCEPT_BACKOFF, _resume, loop, sock, on_readable)
    else:
        log.warning("%s: accept failed: %s", what, err)


def _resume(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, on_readable: Callable[[], None]
) -> None:
    if sock.fileno() != -1 and not loop.is_closed():  # not closed meanwhile
        loop.add_reader(sock.fileno(), on_readable)
