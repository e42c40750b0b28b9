"""Run registry logic without privileges: prefixes, name matching, records, owner liveness."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from netns_testbed import runs


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Point the registry at empty private directories instead of /run."""
    run_dir, netns_dir = tmp_path / "runs", tmp_path / "netns"
    netns_dir.mkdir()
    monkeypatch.setattr(runs, "RUN_DIR", str(run_dir))
    monkeypatch.setattr(runs, "NETNS_DIR", str(netns_dir))
    return run_dir, netns_dir


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_new_prefix_shape_and_uniqueness(dirs: tuple[Path, Path]) -> None:
    seen = {runs.new_prefix() for _ in range(200)}
    assert len(seen) == 200
    for p in seen:
        assert runs.AUTO_PREFIX_RE.match(p), p
        assert runs.normalize_prefix(p) == p
        assert len(p + "br") <= 15  # fits even where a name limit would apply


def test_new_prefix_skips_taken_ones(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, netns_dir = dirs
    run_dir.mkdir()
    (run_dir / "smaaaaaa-.json").write_text("{}")
    (netns_dir / "smbbbbbb-cn").touch()
    answers = iter(["aaaaaa", "bbbbbb", "cccccc"])
    monkeypatch.setattr(runs.secrets, "token_hex", lambda n: next(answers))
    assert runs.new_prefix() == "smcccccc-"


@pytest.mark.parametrize(
    "raw,expected", [("sm3fa9c1", "sm3fa9c1-"), ("sm3fa9c1-", "sm3fa9c1-"), ("t1-", "t1-")]
)
def test_normalize_prefix_accepts(raw: str, expected: str) -> None:
    assert runs.normalize_prefix(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "-", "s", "SM3FA9C1", "sm3fa9c1--", "a-b-", "../x", "sm/x", "1abc", "a" * 17, "sm 1"],
)
def test_normalize_prefix_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="invalid run prefix"):
        runs.normalize_prefix(raw)


@pytest.mark.parametrize(
    "name,prefix,expected",
    [
        ("sm3fa9c1-cn", "sm3fa9c1-", True),
        ("sm3fa9c1-br", "sm3fa9c1-", True),
        ("sm3fa9c1-", "sm3fa9c1-", False),
        ("sm3fa9c1-cn-x", "sm3fa9c1-", False),
        ("sm3fa9c10-cn", "sm3fa9c1-", False),
        ("xsm3fa9c1-cn", "sm3fa9c1-", False),
    ],
)
def test_netns_belongs_to(name: str, prefix: str, expected: bool) -> None:
    assert runs.netns_belongs_to(name, prefix) is expected


def test_record_round_trip(dirs: tuple[Path, Path]) -> None:
    rec = runs.create_record("sm000001", "lan", ["sm000001-br", "sm000001-cn"], os.getpid())
    assert rec.prefix == "sm000001-"
    back = runs.read_record("sm000001-")
    assert back == rec
    assert back.alive and back.state == "alive"
    data = json.loads(Path(runs.record_path("sm000001-")).read_text())
    assert data["version"] == runs.RECORD_VERSION
    assert "orphan" not in data


def test_create_record_refuses_taken_prefix(dirs: tuple[Path, Path]) -> None:
    _, netns_dir = dirs
    runs.create_record("sm000001-", "lan", [], os.getpid())
    with pytest.raises(runs.RunError, match="already has a record"):
        runs.create_record("sm000001-", "lan", [], os.getpid())
    (netns_dir / "sm000002-cn").touch()
    with pytest.raises(runs.RunError, match="in use by namespaces"):
        runs.create_record("sm000002-", "lan", [], os.getpid())
    assert runs.read_record("sm000002-") is None


def test_set_owner(dirs: tuple[Path, Path]) -> None:
    runs.create_record("sm000001-", "lan", [], os.getpid())
    dead = _dead_pid()
    rec = runs.set_owner("sm000001-", dead)
    assert runs.read_record("sm000001-") == rec
    assert rec.owner_pid == dead and rec.state == "stale"
    with pytest.raises(runs.RunError, match="no record"):
        runs.set_owner("sm000009-", os.getpid())


def test_malformed_records(dirs: tuple[Path, Path]) -> None:
    run_dir, _ = dirs
    run_dir.mkdir()
    (run_dir / "sm000001-.json").write_text("{not json")
    (run_dir / "sm000002-.json").write_text(json.dumps({"prefix": "sm000002-", "topology": "lan"}))
    (run_dir / "sm000003-.json").write_text(
        json.dumps({"prefix": "sm000003-", "topology": "lan", "namespaces": "x", "owner_pid": 1})
    )
    with pytest.raises(runs.RunError, match="not valid JSON"):
        runs.read_record("sm000001-")
    for p in ("sm000002-", "sm000003-"):
        with pytest.raises(runs.RunError, match="malformed"):
            runs.read_record(p)
    assert runs.list_runs() == []  # unreadable records are never guessed at


def test_owner_liveness() -> None:
    me = os.getpid()
    start = runs.process_start_time(me)
    assert start is not None
    assert runs.owner_alive(me, start)
    assert runs.owner_alive(me, None)
    assert not runs.owner_alive(me, start + 1)  # same pid, other process: reused
    assert not runs.owner_alive(_dead_pid(), None)
    assert not runs.owner_alive(0, None)
    assert not runs.owner_alive(-1, None)


def test_parse_stat_start_time_handles_odd_comm() -> None:
    rest = " ".join(["S", *[str(i) for i in range(4, 22)], "4242", "0"])
    assert runs.parse_stat_start_time(f"77 (a) b (c)) {rest}".encode()) == 4242
    zombie = rest.replace("S", "Z", 1)
    assert runs.parse_stat_start_time(f"77 (x) {zombie}".encode()) is None


def test_list_runs_states_and_orphans(dirs: tuple[Path, Path]) -> None:
    _, netns_dir = dirs
    runs.create_record("sm00000a-", "lan", ["sm00000a-cn"], os.getpid())
    runs.create_record("sm00000b-", "lan", ["sm00000b-cn"], _dead_pid())
    for name in (
        "sm00000a-cn",
        "sm00000b-cn",
        "sm00000c-cn",
        "sm00000c-ed",
        "other",
        "smzzzzzz-cn",
    ):
        (netns_dir / name).touch()
    by_prefix = {r.prefix: r for r in runs.list_runs()}
    assert sorted(by_prefix) == ["sm00000a-", "sm00000b-", "sm00000c-"]
    assert by_prefix["sm00000a-"].state == "alive"
    assert by_prefix["sm00000b-"].state == "stale"
    orphan = by_prefix["sm00000c-"]
    assert orphan.state == "orphan" and orphan.topology == "?"
    assert orphan.namespaces == ["sm00000c-cn", "sm00000c-ed"]
    assert sorted(r.prefix for r in runs.stale_runs()) == ["sm00000b-", "sm00000c-"]


def test_remove_run_of_records_and_orphans(dirs: tuple[Path, Path]) -> None:
    """With plain files standing in for namespaces: unmounting fails harmlessly, unlink works."""
    _, netns_dir = dirs
    runs.create_record("sm00000b-", "lan", ["sm00000b-cn", "sm00000b-ed"], _dead_pid())
    for name in ("sm00000b-cn", "sm00000c-cn", "sm00000d-cn"):
        (netns_dir / name).touch()
    assert runs.remove_run("sm00000b") == ["sm00000b-cn"]  # ed was never created
    assert runs.read_record("sm00000b-") is None
    assert runs.remove_run("sm00000c-") == ["sm00000c-cn"]
    assert runs.remove_run("sm00000c-") == []  # idempotent
    assert sorted(os.listdir(netns_dir)) == ["sm00000d-cn"]
