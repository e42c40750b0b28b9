"""Interface R frames: what encode_frame writes read_frame reads back, and hostile bytes fail.

A frame comes from another device. Every malformed, truncated or oversized input must become a
WireError (a ValueError) with a reason — never another exception, a hang, or a read sized by
an announced length over the limit. A clean EOF between frames is a ConnectionError.
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import msgpack
import pytest

from sessmob.rm.wire import MAX_FRAME, WireError, decode_frame, encode_frame, field, read_frame


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def read(data: bytes, *, eof: bool = True, max_size: int = MAX_FRAME) -> dict[str, Any]:
    """read_frame over `data`; a read that would wait for more bytes fails after 1 s."""

    async def go() -> dict[str, Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await asyncio.wait_for(read_frame(reader, max_size), 1.0)

    return asyncio.run(go())


def packed(obj: Any) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True))


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_keeps_every_field_and_the_binary_payload() -> None:
    msg = {"t": "transfer", "id": 7, "rid": "r-1", "p": bytes(range(256)) * 64, "go": True}
    assert read(encode_frame(msg)) == msg


def test_payload_travels_as_msgpack_bin_once() -> None:
    payload = b"\x00" * 1000
    data = encode_frame({"t": "transfer", "id": 1, "p": payload})
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    # bin 16 marker followed by the length: the payload is not re-encoded as an array/str
    assert b"\xc5" + struct.pack(">H", 1000) + payload in data
    assert len(data) < len(payload) + 40


def test_two_frames_back_to_back_are_read_in_order() -> None:
    async def go() -> list[dict[str, Any]]:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame({"t": "a", "id": 1}) + encode_frame({"t": "b", "id": 2}))
        reader.feed_eof()
        return [await read_frame(reader), await read_frame(reader)]

    assert [m["t"] for m in asyncio.run(go())] == ["a", "b"]


# -- encode refuses what it must not send -------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        {"id": 1},  # no type
        {"t": "", "id": 1},
        {"t": 5, "id": 1},
        {"t": "x"},  # no id
        {"t": "x", "id": -1},
        {"t": "x", "id": True},
        {"t": "x", "id": "1"},
        {"t": "x", "id": 1, "p": "text, not bytes"},
        {"t": "x", "id": 1, 3: "int key"},
        {"t": "x", "id": 1, "v": object()},  # not encodable
    ],
)
def test_encode_refuses_bad_messages(msg: dict[Any, Any]) -> None:
    with pytest.raises(WireError):
        encode_frame(msg)


def test_encode_refuses_a_non_map() -> None:
    with pytest.raises(WireError, match="not a map"):
        encode_frame(["t", "x"])  # type: ignore[arg-type]


# -- read refuses hostile input ----------------------------------------------------------------


def test_oversized_length_is_refused_before_the_body_is_read() -> None:
    # Only the header arrives and the stream stays open: waiting for the body would hang.
    with pytest.raises(WireError, match="over the 1024-byte limit"):
        read(struct.pack(">I", 1025), eof=False, max_size=1024)
    with pytest.raises(WireError, match="limit"):
        read(b"\xff\xff\xff\xff", eof=False)


def test_a_frame_at_the_limit_is_accepted() -> None:
    data = encode_frame({"t": "x", "id": 1, "p": b"a" * 100})
    assert read(data, max_size=len(data) - 4)["p"] == b"a" * 100
    with pytest.raises(WireError):
        read(data, max_size=len(data) - 5)


def test_clean_eof_between_frames_is_a_connection_error() -> None:
    with pytest.raises(ConnectionError):
        read(b"")
    with pytest.raises(ConnectionError):
        # not a WireError: a closed connection is not a malformed frame
        try:
            read(b"")
        except WireError:
            pytest.fail("clean EOF reported as a malformed frame")


def test_truncated_header_is_refused() -> None:
    with pytest.raises(WireError, match="truncated frame header"):
        read(b"\x00\x00")


def test_truncated_body_is_refused() -> None:
    data = encode_frame({"t": "x", "id": 1, "p": b"z" * 50})
    with pytest.raises(WireError, match="truncated frame"):
        read(data[:-10])


def test_empty_frame_is_refused() -> None:
    with pytest.raises(WireError, match="empty"):
        read(struct.pack(">I", 0))


@pytest.mark.parametrize(
    "obj", [[1, 2], 5, "x", b"bytes", None, True, 1.5], ids=lambda o: type(o).__name__
)
def test_a_frame_that_is_not_a_map_is_refused(obj: Any) -> None:
    with pytest.raises(WireError, match="not a map"):
        read(packed(obj))


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"id": 1}, "'t'"),
        ({"t": 1, "id": 1}, "'t'"),
        ({"t": b"bytes", "id": 1}, "'t'"),
        ({"t": "", "id": 1}, "'t'"),
        ({"t": "x"}, "'id'"),
        ({"t": "x", "id": "1"}, "'id'"),
        ({"t": "x", "id": -3}, "'id'"),
        ({"t": "x", "id": 1 << 63}, "'id'"),
        ({"t": "x", "id": False}, "'id'"),
        ({"t": "x", "id": 1.0}, "'id'"),
        ({"t": "x", "id": 1, "p": "str"}, "payload"),
        ({"t": "x", "id": 1, "p": [1]}, "payload"),
        ({"t": "x", "id": 1, b"k": 1}, "key"),
    ],
)
def test_wrong_envelope_types_are_refused(obj: dict[Any, Any], match: str) -> None:
    with pytest.raises(WireError, match=match):
        read(packed(obj))


def test_integer_map_key_is_refused() -> None:
    body = b"\x83\xa1t\xa1x\xa2id\x01\x05\x06"  # {"t":"x","id":1, 5:6}
    with pytest.raises(WireError):
        read(frame(body))


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x82\xa1t",  # map cut short inside the body
        msgpack.packb({"t": "x", "id": 1}) + b"\x00",  # trailing data
        b"\x81\xa1t\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x81\xa1t\xd4\x05\x00",  # fixext 1: extension types are not part of R
        b"\x91" * 100_000 + b"\x00",  # nesting deeper than the decoder's stack
        b"\x81\x91\x01\x02",  # unhashable (array) map key
    ],
    ids=["reserved", "short", "trailing", "utf8", "ext", "deep", "array-key"],
)
def test_undecodable_bodies_are_wire_errors(body: bytes) -> None:
    with pytest.raises(WireError):
        read(frame(body))


def test_timestamps_are_refused_like_any_extension() -> None:
    body = msgpack.packb({"t": "x", "id": 1, "when": msgpack.Timestamp(1, 0)})
    with pytest.raises(WireError, match="extension"):
        read(frame(body))


def test_unknown_types_pass_the_envelope_for_the_protocol_to_judge() -> None:
    # The frame layer checks the envelope only; sessmob.rm.peer refuses unknown types.
    assert decode_frame(msgpack.packb({"t": "no-such-type", "id": 3}))["t"] == "no-such-type"


def test_random_bytes_only_ever_raise_wire_or_connection_errors() -> None:
    rng = random.Random(4)
    valid = encode_frame({"t": "check", "id": 1, "offer": {"a": [1, 2.5, None, b"x"]}})
    for i in range(3000):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:  # mutate a valid frame, keeping most of its structure
            buf = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf[: rng.randrange(len(buf) + 1)])
        try:
            msg = read(data, max_size=1 << 16)
        except (WireError, ConnectionError):
            continue
        assert isinstance(msg["t"], str) and isinstance(msg["id"], int)


# -- field() -----------------------------------------------------------------------------------


def test_field_checks_presence_and_type() -> None:
    msg = {"t": "x", "id": 1, "rid": "r", "n": 3, "flag": True, "f": 0.5}
    assert field(msg, "rid", str) == "r"
    assert field(msg, "n", int) == 3
    assert field(msg, "f", int, float) == 0.5
    assert field(msg, "flag", bool) is True
    assert field(msg, "missing", str, optional=True) is None
    with pytest.raises(WireError, match="lacks field 'missing'"):
        field(msg, "missing", str)
    with pytest.raises(WireError, match="'rid' must be int"):
        field(msg, "rid", int)
    with pytest.raises(WireError, match="must be int"):
        field(msg, "flag", int)  # a bool is not a number on the wire
