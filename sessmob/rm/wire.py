"""Frames of interface R: a 4-byte big-endian length, then one msgpack map.

Every frame is a map with at least ``"t"`` (the message type, a string) and ``"id"`` (the
request id, an unsigned integer; replies echo it). Bulky data — the exchange document — rides as
one msgpack ``bin`` field ``"p"``, so it is copied once into the frame and never re-encoded.

The other RM is a remote party: everything here treats its bytes as hostile. A length over the
limit is refused before the body is read (no allocation sized by the peer), and any decoding
problem becomes a WireError (a ValueError) saying what was wrong.
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import msgpack

MAX_FRAME = 256 << 20  # a session's queued bytes plus < 1 KiB per flow fits many times over
HEADER_LEN = 4
_MAX_ID = (1 << 63) - 1


class WireError(ValueError):
    """A frame that is malformed, oversized or truncated: the channel cannot be trusted further."""


def encode_frame(msg: dict[str, Any]) -> bytes:
    """Length-prefixed msgpack of `msg` (which needs a str "t" and an int "id")."""
    check_envelope(msg)
    try:
        body = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"cannot encode {msg['t']!r} message: {e}") from e
    if len(body) > MAX_FRAME:
        raise WireError(f"{msg['t']!r} message is {len(body)} bytes, over the {MAX_FRAME} limit")
    return len(body).to_bytes(HEADER_LEN, "big") + body


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise WireError(f"msgpack extension type {code} is not allowed")


def decode_frame(body: bytes) -> dict[str, Any]:
    """Decode one frame body (without its length prefix) and check the envelope."""
    if not body:
        raise WireError("empty frame")
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except WireError:
        raise
    except Exception as e:  # msgpack raises ValueError, TypeError, StackError, ...
        raise WireError(f"undecodable frame ({type(e).__name__}: {e})") from e
    if not isinstance(msg, dict):
        raise WireError(f"frame is a {type(msg).__name__}, not a map")
    check_envelope(msg)
    _check_plain(msg)
    return msg


_SCALARS = (str, bytes, int, float, bool, type(None))


def _check_plain(msg: dict[str, Any]) -> None:
    # msgpack decodes its timestamp extension natively (not through ext_hook): keep every
    # value to the plain types the handlers expect, so none can smuggle in another class.
    stack: list[Any] = [msg]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif not isinstance(v, _SCALARS):
            raise WireError(f"value of type {type(v).__name__} (a msgpack extension) not allowed")


def check_envelope(msg: Any) -> None:
    """Raise WireError unless `msg` is a map with str keys, a str "t" and a valid int "id"."""
    if not isinstance(msg, dict):
        raise WireError(f"message is a {type(msg).__name__}, not a map")
    for k in msg:
        if not isinstance(k, str):
            raise WireError(f"message key {k!r} is not a string")
    t = msg.get("t")
    if not isinstance(t, str) or not t:
        raise WireError(f"message type 't' must be a non-empty string, got {t!r}")
    rid = msg.get("id")
    if type(rid) is not int or not 0 <= rid <= _MAX_ID:
        raise WireError(f"{t!r} message: 'id' must be an unsigned integer, got {rid!r}")
    if "p" in msg and not isinstance(msg["p"], bytes):
        raise WireError(f"{t!r} message: payload 'p' must be binary, got {type(msg['p']).__name__}")


def field(msg: dict[str, Any], name: str, *types: type, optional: bool = False) -> Any:
    """`msg[name]`, checked to be one of `types` (bool never counts as int); WireError if not."""
    if name not in msg:
        if optional:
            return None
        raise WireError(f"{msg.get('t')!r} message lacks field {name!r}")
    value = msg[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        want = " or ".join(t.__name__ for t in types)
        raise WireError(
            f"{msg.get('t')!r} message: field {name!r} must be {want}, got {type(value).__name__}"
        )
    return value


async def read_frame(reader: asyncio.StreamReader, max_size: int = MAX_FRAME) -> dict[str, Any]:
    """Read one frame from an asyncio stream (for tools and tests that speak R that way; the
    RMs themselves read through SocketChannel). EOF between frames is ConnectionError; EOF
    inside one is WireError."""
    try:
        header = await reader.readexactly(HEADER_LEN)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise ConnectionError("connection closed by peer") from None
        raise WireError(
            f"truncated frame header ({len(e.partial)} of {HEADER_LEN} bytes)"
        ) from None
    size = int.from_bytes(header, "big")
    if size > max_size:
        raise WireError(f"frame of {size} bytes announced, over the {max_size}-byte limit")
    if size == 0:
        raise WireError("empty frame")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as e:
        raise WireError(f"truncated frame ({len(e.partial)} of {size} bytes)") from None
    return decode_frame(body)
