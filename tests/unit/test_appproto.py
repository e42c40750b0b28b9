"""The application protocol's framing: round trips, descriptors, and hostile frames.

Each hostile case proves that the decoder refuses the frame with a ProtocolError that says
what was wrong, keeps no descriptor open, and stays refused afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import msgpack
import pytest

from sessmob.appproto import (
    APP_REQUESTS,
    HEADER,
    RM_REQUESTS,
    SCM_MAX_FD,
    Decoder,
    Limits,
    Message,
    ProtocolError,
    encode_reply,
    encode_request,
    fds_expected,
    recv_chunk,
    send_frame,
    uid_allowed,
)

LIMITS = Limits(max_frame=4096, max_fds=600)


def raw_frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def rm_side() -> Decoder:
    """The RM's decoder: accepts the application's requests."""
    return Decoder(APP_REQUESTS, LIMITS)


def app_side() -> Decoder:
    return Decoder(RM_REQUESTS, LIMITS)


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    r, w = os.pipe()
    fds = [r, w]
    yield fds
    for fd in fds:
        if fd_open(fd):
            os.close(fd)


def feed_all(dec: Decoder, data: bytes, fds: list[int] | None = None) -> list[Message]:
    return dec.feed(data, fds or [])


# -- round trips -------------------------------------------------------------------------------


def test_request_round_trip_in_one_piece() -> None:
    frame = encode_request("create_session", 7, {"session_type": "echo"})
    [msg] = feed_all(rm_side(), frame)
    assert (msg.op, msg.id, msg.body, msg.fds) == (
        "create_session",
        7,
        {"session_type": "echo"},
        [],
    )
    assert not msg.is_reply


def test_frames_split_at_every_byte_and_glued_together() -> None:
    frames = encode_request("hello", 1, {"proto": 1, "name": "a", "pid": 5, "importer_types": []})
    frames += encode_request("close_session", 2, {"session_id": "s1"})
    dec = rm_side()
    got: list[Message] = []
    for i in range(len(frames)):
        got += dec.feed(frames[i : i + 1])
    assert [m.op for m in got] == ["hello", "close_session"]
    assert dec.pending_bytes == 0


def test_reply_round_trip_and_result_validation() -> None:
    [ok] = feed_all(
        app_side(), encode_reply(3, {"session_id": "s", "addresses": ["2001:db8::5/64"]})
    )
    assert ok.is_reply and ok.ok and ok.id == 3
    assert ok.result("create_session") == {"session_id": "s", "addresses": ["2001:db8::5/64"]}
    with pytest.raises(ProtocolError, match="unknown field 'session_id'"):
        ok.result("suspend")
    [empty] = feed_all(app_side(), encode_reply(5, {}))
    with pytest.raises(ProtocolError, match="reply to suspend: missing field 'state'"):
        empty.result("suspend")
    [err] = feed_all(app_side(), encode_reply(4, error="no such session"))
    assert not err.ok and err.error == "no such session"


def test_state_blob_is_bytes_and_survives_unchanged() -> None:
    blob = bytes(range(256)) * 8
    [msg] = feed_all(rm_side(), encode_reply(9, {"state": blob}, limits=LIMITS))
    assert msg.result("suspend")["state"] == blob


def test_add_flow_carries_one_descriptor_over_a_real_socket(pipe_fds: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        frame = encode_request("add_flow", 1, {"session_id": "s1"}, nfds=1)
        send_frame(a, frame, [pipe_fds[0]])
        data, fds = recv_chunk(b)
        [msg] = rm_side().feed(data, fds)
        assert msg.op == "add_flow" and len(msg.fds) == 1
        assert os.fstat(msg.fds[0]).st_ino == os.fstat(pipe_fds[0]).st_ino
        msg.close_fds()


def test_import_with_more_descriptors_than_one_message_holds() -> None:
    """Beyond 253 descriptors the sender splits them over several messages of one frame."""
    n = SCM_MAX_FD * 2 + 7
    r, w = os.pipe()
    try:
        flows = [{"flow_id": f"f{i}", "kind": "tcp"} for i in range(n)]
        fields = {"session_id": "s", "session_type": "echo", "state": b"x", "addresses": []}
        frame = encode_request("import", 5, {**fields, "flows": flows}, nfds=n,
                               limits=Limits(max_frame=1 << 20, max_fds=n))  # fmt: skip
        a, b = socket.socketpair()
        with a, b:
            send_frame(a, frame, [r] * n)
            dec = Decoder(RM_REQUESTS, Limits(max_frame=1 << 20, max_fds=n))
            got: list[Message] = []
            calls = 0
            while not got:
                data, fds = recv_chunk(b)
                assert len(fds) <= SCM_MAX_FD
                calls += 1
                got = dec.feed(data, fds)
            [msg] = got
            assert calls >= 3 and len(msg.fds) == n
            ino = os.fstat(r).st_ino
            assert all(os.fstat(fd).st_ino == ino for fd in msg.fds)
            msg.close_fds()
    finally:
        os.close(r)
        os.close(w)


# -- hostile frames ----------------------------------------------------------------------------


def refused(dec: Decoder, data: bytes, match: str, fds: list[int] | None = None) -> None:
    with pytest.raises(ProtocolError, match=match):
        dec.feed(data, fds or [])
    for fd in fds or []:
        assert not fd_open(fd), "a refused frame's descriptor was left open"
    # The decoder stays refused: nothing after a bad frame is taken.
    with pytest.raises(ProtocolError):
        dec.feed(encode_request("close_session", 99, {"session_id": "s"}))


def test_oversized_length_is_refused_before_reading_the_body() -> None:
    refused(rm_side(), HEADER.pack(0xFFFFFFFF) + b"\x80", "exceeds the limit of 4096")


def test_empty_frame_is_refused() -> None:
    refused(rm_side(), HEADER.pack(0), "empty frame")


def test_truncated_frame_at_end_of_connection() -> None:
    frame = encode_request("close_session", 1, {"session_id": "s"})
    dec = rm_side()
    assert dec.feed(frame[:-3]) == []
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        dec.eof()


def test_truncated_frame_with_descriptor_closes_it(pipe_fds: list[int]) -> None:
    frame = encode_request("add_flow", 1, {"session_id": "s"}, nfds=1)
    dec = rm_side()
    assert dec.feed(frame[:5], [pipe_fds[0]]) == []
    with pytest.raises(ProtocolError, match="1 descriptors of it"):
        dec.eof()
    assert not fd_open(pipe_fds[0])


def test_not_msgpack() -> None:
    refused(rm_side(), HEADER.pack(3) + b"\xc1\xc1\xc1", "not valid msgpack")


def test_trailing_bytes_inside_a_frame() -> None:
    body = msgpack.packb({"op": "close_session", "id": 1, "session_id": "s"}) + b"\x00"
    refused(rm_side(), HEADER.pack(len(body)) + body, "not valid msgpack")


def test_top_level_not_a_map() -> None:
    refused(rm_side(), raw_frame(["close_session", 1]), "must hold a msgpack map")


def test_non_string_map_key() -> None:
    refused(rm_side(), raw_frame({"op": "close_session", "id": 1, 5: "x"}), "map key")


def test_bytes_map_key() -> None:
    refused(rm_side(), raw_frame({b"op": "close_session", "id": 1}), "keys must be strings")


def test_op_of_wrong_type() -> None:
    refused(rm_side(), raw_frame({"op": 3, "id": 1}), "without a string 'op'")


def test_id_of_wrong_type_or_range() -> None:
    refused(rm_side(), raw_frame({"op": "close_session", "id": "1", "session_id": "s"}),
            "must be an integer")  # fmt: skip
    refused(rm_side(), raw_frame({"op": "close_session", "id": -1, "session_id": "s"}),
            "out of range")  # fmt: skip
    refused(rm_side(), raw_frame({"op": "close_session", "id": True, "session_id": "s"}),
            "must be an integer")  # fmt: skip


def test_field_of_wrong_type() -> None:
    refused(rm_side(), raw_frame({"op": "close_session", "id": 1, "session_id": 42}),
            r"close_session\.session_id must be a string")  # fmt: skip
    refused(rm_side(), raw_frame({"op": "close_session", "id": 1, "session_id": b"s"}),
            "must be a string, got bytes")  # fmt: skip
    hello = {"op": "hello", "id": 1, "proto": 1, "name": "a", "pid": 1, "importer_types": "echo"}
    refused(rm_side(), raw_frame(hello), "importer_types must be a list")


def test_missing_and_unknown_fields() -> None:
    refused(rm_side(), raw_frame({"op": "close_session", "id": 1}), "missing field 'session_id'")
    refused(rm_side(), raw_frame({"op": "close_session", "id": 1, "session_id": "s", "x": 1}),
            "unknown field 'x'")  # fmt: skip


def test_oversized_string_and_list() -> None:
    refused(rm_side(), raw_frame({"op": "close_session", "id": 1, "session_id": "s" * 300}),
            "must be 1..256")  # fmt: skip
    hello = {"op": "hello", "id": 1, "proto": 1, "name": "a", "pid": 1,
             "importer_types": ["t"] * 65}  # fmt: skip
    refused(rm_side(), raw_frame(hello), "exceed the limit of 64")


def test_invalid_utf8_string() -> None:
    body = msgpack.packb({"op": "close_session", "id": 1, "session_id": "s"})
    body = body.replace(b"\xa1s", b"\xa1\xff")
    refused(rm_side(), HEADER.pack(len(body)) + body, "not valid msgpack")


def test_extension_types_are_refused() -> None:
    obj = {"op": "close_session", "id": 1, "session_id": msgpack.ExtType(5, b"x")}
    refused(rm_side(), raw_frame(obj), "extension type 5")


def test_unknown_op() -> None:
    refused(
        rm_side(), raw_frame({"op": "format_disk", "id": 1}), "unknown operation: 'format_disk'"
    )


def test_op_from_the_wrong_direction() -> None:
    """An application may not send the RM's requests, and the other way round."""
    refused(rm_side(), raw_frame({"op": "suspend", "id": 1, "session_id": "s"}),
            "not accepted in this direction")  # fmt: skip
    refused(app_side(), raw_frame({"op": "close_session", "id": 1, "session_id": "s"}),
            "not accepted in this direction")  # fmt: skip


def test_too_many_descriptors_declared() -> None:
    refused(rm_side(), raw_frame({"op": "add_flow", "id": 1, "session_id": "s", "nfd": 601}),
            "more than the limit of 600")  # fmt: skip


def test_descriptor_count_must_match_the_op(pipe_fds: list[int]) -> None:
    frame = raw_frame({"op": "add_flow", "id": 1, "session_id": "s", "nfd": 2})
    refused(rm_side(), frame, "must carry 1 descriptor", list(pipe_fds))


def test_prepare_carries_the_sockets_and_a_prepared_import_none(pipe_fds: list[int]) -> None:
    flows = [{"flow_id": "f0", "kind": "tcp"}, {"flow_id": "u", "kind": "udp"}]
    prep = {"session_id": "s", "session_type": "demo", "flows": flows}
    assert fds_expected("prepare", prep) == 2
    [m] = app_side().feed(encode_request("prepare", 1, prep, 2), list(pipe_fds))
    assert m.op == "prepare" and m.fds == pipe_fds
    imp = {"session_id": "s", "session_type": "demo", "state": b"x", "addresses": [],
           "flows": flows}  # fmt: skip
    assert fds_expected("import", imp) == 2
    assert fds_expected("import", {**imp, "prepared": True}) == 0
    [m] = app_side().feed(encode_request("import", 2, {**imp, "prepared": True}))
    assert m.body["prepared"] is True and m.fds == []
    frame = raw_frame({"op": "import", "id": 3, **imp, "prepared": True, "nfd": 1})
    refused(app_side(), frame, "must carry 0 descriptor", [os.dup(pipe_fds[0])])
    refused(app_side(), raw_frame({"op": "import", "id": 4, **imp, "prepared": 1}),
            "prepared must be a boolean")  # fmt: skip
    with pytest.raises(ProtocolError, match="carries 2 descriptors, not 0"):
        encode_request("prepare", 5, prep, 0)


def test_descriptors_promised_but_missing() -> None:
    refused(rm_side(), raw_frame({"op": "add_flow", "id": 1, "session_id": "s", "nfd": 1}),
            "carries 1 descriptors but 0 arrived")  # fmt: skip


def test_descriptors_nobody_claims_are_closed(pipe_fds: list[int]) -> None:
    frame = encode_request("close_session", 1, {"session_id": "s"})
    refused(rm_side(), frame, "no frame claims", [pipe_fds[0]])


def test_reply_may_not_carry_descriptors(pipe_fds: list[int]) -> None:
    frame = raw_frame({"op": "reply", "id": 1, "ok": True, "nfd": 1})
    refused(app_side(), frame, "reply may not carry descriptors", [pipe_fds[0]])


def test_malformed_replies() -> None:
    refused(app_side(), raw_frame({"op": "reply", "id": 1}), "reply.ok must be a boolean")
    refused(app_side(), raw_frame({"op": "reply", "id": 1, "ok": False}), "missing field 'error'")
    refused(app_side(), raw_frame({"op": "reply", "id": 1, "ok": True, "error": "x"}),
            "may not carry 'error'")  # fmt: skip


def test_valid_frames_before_a_bad_one_release_their_descriptors(pipe_fds: list[int]) -> None:
    good = encode_request("add_flow", 1, {"session_id": "s"}, nfds=1)
    bad = HEADER.pack(1 << 30)
    refused(rm_side(), good + bad, "exceeds the limit", [pipe_fds[0]])


def test_sender_refuses_what_the_receiver_would() -> None:
    with pytest.raises(ProtocolError, match="unknown operation"):
        encode_request("nope", 1, {})
    with pytest.raises(ProtocolError, match="carries 1 descriptors, not 0"):
        encode_request("add_flow", 1, {"session_id": "s"})
    with pytest.raises(ProtocolError, match="exceeds the frame limit"):
        encode_reply(1, {"state": b"x" * 5000}, limits=LIMITS)


def test_kernel_truncated_descriptors_are_an_error() -> None:
    """More than SCM_MAX_FD descriptors in one sendmsg: the kernel refuses the send."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", r) * (SCM_MAX_FD + 1))]
        with pytest.raises(OSError):
            a.sendmsg([b"x"], anc)
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        Limits(max_frame=10)
    with pytest.raises(ValueError):
        Limits(max_fds=0)


def test_root_is_always_allowed() -> None:
    assert uid_allowed(0, set())
    assert uid_allowed(1000, {1000})
    assert not uid_allowed(1000, set())
    assert not uid_allowed(1001, {1000})
