"""`sessmob bench`: argument checks, the hand-over from the `sessmob` command, and the verdict
and table shared with `bench tcp` (netns_testbed.bench) for a scenario with a floor.

The measurement itself runs in tests/netns/test_bench_rm.py.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from netns_testbed import bench, bench_rm
from sessmob import cli


def test_help_describes_the_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: sessmob bench" in out
    for word in ("rm-echo-addr", "--runs", "--json", "floor", "Exit status"):
        assert word in out


def test_top_level_help_lists_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs", "0"], "--runs must be between 1 and"),
        (["--runs", "-5"], "--runs must be between 1 and"),
        (["--runs", "many"], "invalid int value"),
        (["--interval-ms", "-1"], "--interval-ms must be between 0 and 10000"),
        (["--json", "/nonexistent-dir-for-sessmob/x.json"], "does not exist"),
        (["--json", "/"], "is a directory"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_before_measuring(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    def must_not_run(*a: Any, **k: Any) -> None:
        raise AssertionError("measured despite bad arguments")

    monkeypatch.setattr(bench_rm, "run", must_not_run)
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_not_root_exits_2(monkeypatch: Any, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_rm.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(bench_rm, "run", lambda *a, **k: pytest.fail("ran without root"))
    assert cli.main(["bench", "--runs", "1"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_cli_hands_arguments_over_untouched(monkeypatch: Any) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(bench_rm, "main", fake_main)
    assert cli.main(["--state-dir", "/tmp/x", "bench", "--runs", "3", "--json", "f"]) == 7
    assert seen == [["--runs", "3", "--json", "f"]]


def result(t_mig: float, p99: float, ratio: float | None, lost: int = 0) -> dict[str, Any]:
    return {
        "runs": 5,
        "t_mig_ms": {"median": t_mig, "p99": p99},
        "phases_ms": {"Suspend": {"median": 0.5, "p99": 0.9}},
        "cn_stall_ms": None,
        "bytes_lost": lost,
        "bytes_duplicated": 0,
        "problems": [],
        "cn_resets": 0,
        "cn_rto_count": 0,
        "cn_tlp_count": 0,
        "cn_retrans_segs": 3,
        "floor_ms": {"median": 1.0, "p99": 2.0},
        "ratio_to_floor": ratio,
        "targets": dict(bench_rm.TARGETS),
    }


@pytest.mark.parametrize(
    ("r", "verdict"),
    [
        (result(1.5, 4.0, 1.4), "met"),
        (result(2.5, 4.0, 1.4), "MISSED"),  # median
        (result(1.5, 6.0, 1.4), "MISSED"),  # p99
        (result(1.5, 4.0, 1.6), "MISSED"),  # ratio to the floor
        (result(1.5, 4.0, None), "MISSED"),  # no floor measured: not met
        (result(1.5, 4.0, 1.4, lost=1), "MISSED"),
    ],
)
def test_verdict_checks_the_ratio_to_the_floor(r: dict[str, Any], verdict: str) -> None:
    assert bench._verdict(r) == verdict


def test_table_prints_a_scenario_without_freeze_to_restored() -> None:
    out = io.StringIO()
    bench.print_table({"rm-echo-addr": result(1.5, 4.0, 1.4)}, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("scenario")
    row = lines[1].split()
    assert row[:4] == ["rm-echo-addr", "5", "1.500/4.000", "-"]
    assert row[-1] == "met"
    assert "rm-echo-addr: Suspend 0.500" in out.getvalue()


def test_cold_probe_times_the_same_workload_warm_and_after_a_pause() -> None:
    from netns_testbed import coldprobe

    r = coldprobe.measure(runs=5, pause=0.002)
    assert r["pause_ms"] == 2.0 and "exchange.decode" in r["workload"]
    assert 0 < r["warm_us"] < 10_000 and 0 < r["after_pause_us"] < 100_000
    assert abs(r["ratio"] - r["after_pause_us"] / r["warm_us"]) < 0.2
