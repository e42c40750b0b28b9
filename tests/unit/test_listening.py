"""accept_failed: a listener that runs out of descriptors pauses instead of spinning."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import pytest

from sessmob import listening


def test_out_of_descriptors_pauses_then_resumes_other_errors_only_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(listening, "ACCEPT_BACKOFF", 0.05)
    log = logging.getLogger("test.listening")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind("\0sessmob-test-listening")  # abstract: nothing on disk
        lsock.listen()
        lsock.setblocking(False)
        calls = []

        def on_readable() -> None:
            calls.append(1)
            with pytest.raises(BlockingIOError):
                lsock.accept()  # nothing pending: only the registration matters here

        loop.add_reader(lsock.fileno(), on_readable)
        listening.accept_failed(loop, lsock, on_readable, OSError(errno.EMFILE, "x"), log, "L")
        assert not loop.remove_reader(lsock.fileno())  # paused: no reader registered
        await asyncio.sleep(0.1)
        assert loop.remove_reader(lsock.fileno())  # resumed after the back-off
        loop.add_reader(lsock.fileno(), on_readable)
        listening.accept_failed(
            loop, lsock, on_readable, OSError(errno.ECONNABORTED, "y"), log, "L"
        )
        assert loop.remove_reader(lsock.fileno())  # one connection's error: still listening
        # closed during the pause: not registered again (its number may be reused)
        listening.accept_failed(loop, lsock, on_readable, OSError(errno.ENFILE, "z"), log, "L")
        lsock.close()
        await asyncio.sleep(0.1)
        assert calls == []

    with caplog.at_level(logging.WARNING, "test.listening"):
        asyncio.run(main())
    msgs = [r.getMessage() for r in caplog.records]
    assert any("not accepting for 0.05 s" in m for m in msgs)
    assert any("accept failed: [Errno 103] y" in m for m in msgs)
