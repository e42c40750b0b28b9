"""`sessmob bench` for real, with a few moves: the JSON it writes has the documented keys and
numbers that hang together (docs/testbed.md, "The RM benchmark")."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from netns_testbed import bench_rm
from sessmob import cli
from sessmob.cpu_awake import current_cpu_latency_us

SCENARIO_KEYS = {
    "runs", "kind", "flows", "rate_bytes_per_s", "t_mig_ms", "phases_ms", "importer_phases_ms",
    "move_wall_ms", "cn_stall_ms", "baseline_cn_stall_ms", "stall_ratio_to_baseline",
    "bytes_lost", "bytes_duplicated", "bytes_verified", "problems", "cn_resets", "cn_rto_count",
    "cn_tlp_count", "cn_retrans_segs", "floor_ms", "ratio_to_floor", "floor", "targets",
    "python_after_pause", "keep_cpus_awake",
}  # fmt: skip
IN_T_MIG = ("Suspend", "GetState")


def test_bench_writes_the_documented_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = 4
    out = tmp_path / "rm.json"
    rc = cli.main(["bench", "--runs", str(runs), "--interval-ms", "20", "--json", str(out)])
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert set(doc) == {"schema_version", "machine", "scenarios"}
    assert doc["schema_version"] == 1
    assert set(doc["scenarios"]) == {bench_rm.NAME}
    r = doc["scenarios"][bench_rm.NAME]
    assert set(r) == SCENARIO_KEYS
    assert r["problems"] == [], r["problems"]
    assert rc == 0
    assert r["runs"] == runs and r["floor"]["runs"] == runs
    assert r["rate_bytes_per_s"] == 10e6
    assert r["bytes_lost"] == r["bytes_duplicated"] == r["cn_resets"] == 0
    assert r["bytes_verified"] > 2 * 64 * 1024
    # the timeline: the steps inside t_Mig add up to no more than t_Mig
    for step in IN_T_MIG:
        assert step in r["phases_ms"], r["phases_ms"]
    assert 0 < r["t_mig_ms"]["median"] <= r["t_mig_ms"]["p99"] < r["move_wall_ms"]["p99"]
    assert sum(r["phases_ms"][s]["median"] for s in IN_T_MIG) <= r["t_mig_ms"]["p99"]
    assert r["importer_phases_ms"], "the importer's step times are missing"
    assert r["cn_stall_ms"]["max"] > 0 and r["baseline_cn_stall_ms"]["max"] > 0
    floor = r["floor_ms"]
    assert floor == r["floor"]["t_mig_ms"] and 0 < floor["median"] <= floor["p99"]
    assert r["ratio_to_floor"] == pytest.approx(r["t_mig_ms"]["median"] / floor["median"], 1e-2)
    assert r["targets"] == {"t_mig_median_ms": 2.0, "t_mig_p99_ms": 5.0, "ratio_to_floor": 1.5}
    assert bench_rm.NAME in printed and "floor (raw move" in printed
    cold = r["python_after_pause"]
    assert cold["warm_us"] > 0 and cold["after_pause_us"] > 0 and cold["pause_ms"] == 10.0
    assert "this machine: Python paused 10 ms runs" in printed
    assert r["keep_cpus_awake"] == "during-moves"


@pytest.mark.parametrize("when", ["never", "always"])
def test_bench_runs_the_rms_with_the_cpus_awake_as_asked(tmp_path: Path, when: str) -> None:
    """The option reaches the RMs: with "always" the 0 µs request is in force while they run,
    with "never" it never is."""
    out = tmp_path / "rm.json"
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.add(current_cpu_latency_us())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rc = cli.main(["bench", "--runs", "2", "--cpus-awake", when, "--json", str(out)])
    finally:
        done.set()
        watcher.join()
    r = json.loads(out.read_text())["scenarios"][bench_rm.NAME]
    assert rc == 0 and r["problems"] == [] and r["runs"] == 2
    assert r["keep_cpus_awake"] == when
    assert (0 in seen) == (when == "always"), seen
