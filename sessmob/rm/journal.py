"""The importing RM's record of the reservations it activated, kept across its restarts.

An exporting RM that never got the reply to its transfer asks the importing RM (Abort) what
became of the reservation. If the importing RM crashed after activating and was restarted, it
must still answer "already activated": the importer application runs the session on the
sockets it holds. So each activation is written down (one line, before the reply leaves) and
read back at start. Without fsync: the record has to outlive the RM process, not the machine
(a machine that goes down takes the session with it).
"""

from __future__ import annotations

import logging
import os
import re

__all__ = ["ActivationJournal"]

_log = logging.getLogger("sessmob.rm.journal")
_LINE = re.compile(r"^([0-9a-f]{1,64}) ([A-Za-z0-9_.-]{1,64}|-)$")


class ActivationJournal:
    """Append-only lines `RID PEER` ("-" for an unauthenticated peer), the newest `keep` kept."""

    def __init__(self, path: str, keep: int = 1024) -> None:
        self.path = path
        self.keep = keep
        self._entries = self._load()
        # Rewritten compact at every start, then only appended to.
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{rid} {peer or '-'}\n" for rid, peer in self._entries)
        os.replace(tmp, path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def entries(self) -> list[tuple[str, str | None]]:
        """The activations on record, oldest first: (reservation id, peer name or None)."""
        return list(self._entries)

    def record(self, rid: str, peer: str | None) -> None:
        """Write one activation down (one write(); raises OSError if it cannot)."""
        line = f"{rid} {peer or '-'}\n"
        if not _LINE.match(line[:-1]):
            raise ValueError(f"not a journal line: {line!r}")
        os.write(self._fd, line.encode())
        self._entries.append((rid, peer))
        del self._entries[: -self.keep]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _load(self) -> list[tuple[str, str | None]]:
        try:
            with open(self.path, errors="replace") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out: list[tuple[str, str | None]] = []
        bad = 0
        for line in lines:
            m = _LINE.match(line)
            if m is None:
                bad += 1
                continue
            out.append((m.group(1), None if m.group(2) == "-" else m.group(2)))
        if bad:
            _log.warning("%s: %d malformed line(s) ignored", self.path, bad)
        return out[-self.keep :]
