"""ActivationJournal: what the importing RM activated, read back after a restart."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sessmob.rm.journal import ActivationJournal


def test_records_survive_a_restart_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "activations")
    j = ActivationJournal(path, keep=3)
    assert j.entries() == []
    for i in range(5):
        j.record(f"{i:032x}", "ed" if i % 2 else None)
    assert [rid[-1] for rid, _ in j.entries()] == ["2", "3", "4"]
    j.close()
    again = ActivationJournal(path, keep=3)  # what a restarted RM reads
    assert again.entries() == [(f"{2:032x}", None), (f"{3:032x}", "ed"), (f"{4:032x}", None)]
    again.close()
    assert len(Path(path).read_text().splitlines()) == 3  # compacted at start


def test_malformed_lines_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "activations"
    path.write_text("abc123 ed\nnot a line at all\n\xff\xfe -\ndef456 -\n")
    with caplog.at_level(logging.WARNING, "sessmob.rm.journal"):
        j = ActivationJournal(str(path))
    assert j.entries() == [("abc123", "ed"), ("def456", None)]
    assert "2 malformed line(s) ignored" in caplog.text
    j.close()


def test_a_record_that_would_not_read_back_is_refused(tmp_path: Path) -> None:
    j = ActivationJournal(str(tmp_path / "activations"))
    with pytest.raises(ValueError, match="not a journal line"):
        j.record("r1 injected\nx", None)
    assert j.entries() == []
    j.close()
