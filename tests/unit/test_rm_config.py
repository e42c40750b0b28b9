"""The RM's TOML configuration: what is accepted, and a clear refusal for everything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sessmob.rm.config import ConfigError, load, parse

BASE: dict[str, Any] = {
    "device": "ed",
    "r": {"listen": "2001:db8:1::2", "port": 4700},
    "network": {"interface": "eth0", "pool": ["2001:db8:1::100/64", "192.0.2.100/24"]},
    "devices": {"id": {"host": "2001:db8:1::3"}},
}


def with_(**over: Any) -> dict[str, Any]:
    return {**BASE, **over}


def test_full_config(tmp_path: Path) -> None:
    f = tmp_path / "rm.toml"
    f.write_text(
        'device = "ed"\nadapters = ["application", "net_addr", "tcp"]\n'
        '[r]\nlisten = "2001:db8:1::2"\n'
        '[network]\ninterface = "eth0"\npool = ["2001:db8:1::100/64"]\n'
        '[devices.id]\nhost = "2001:db8:1::3"\nport = 4701\n'
        "[apps]\nallowed_uids = [1000]\n"
        '[importers.echo]\ncommand = ["echo", "--rm-socket", "{state_dir}/app.sock"]\n'
        'user = "nobody"\n'
        "[limits]\nreservation_timeout = 1.5\nmax_document = 1048576\n"
    )
    cfg = load(str(f), "/run/x")
    assert cfg.device == "ed" and cfg.port == 4700
    assert cfg.devices["id"].port == 4701
    assert cfg.allowed_uids == {1000}
    assert cfg.importers["echo"].command[-1] == "/run/x/app.sock"
    assert cfg.importers["echo"].user == "nobody"
    assert cfg.reservation_timeout == 1.5 and cfg.max_document == 1048576
    assert cfg.adapters == ("application", "net_addr", "tcp")
    assert cfg.faults == frozenset()


def test_defaults() -> None:
    cfg = parse(BASE, "/tmp")
    assert cfg.adapters == ("application", "net_addr", "tcp", "udp")
    assert cfg.reservation_timeout == 5.0 and cfg.delay_after_check == 0.0
    assert cfg.keep_cpus_awake == "during-moves"
    for when in ("always", "never"):
        assert parse(with_(moves={"keep_cpus_awake": when}), "/tmp").keep_cpus_awake == when


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({k: v for k, v in BASE.items() if k != "device"}, "missing key 'device'"),
        (with_(device="../etc"), "config.device"),
        (with_(r={"listen": "not-an-ip"}), "r.listen"),
        (with_(r={"listen": "2001:db8:1::2", "port": 70000}), "port must be 1..65535"),
        (with_(r={"listen": "2001:db8:1::2", "port": True}), "port must be 1..65535"),
        (with_(network={"interface": "eth0", "pool": ["2001:db8:1::100"]}), "prefix length"),
        (with_(network={"interface": "eth0", "pool": ["nonsense/64"]}), "addr/prefixlen"),
        (with_(devices={"id": {"port": 1}}), "missing key 'host'"),
        (with_(apps={"allowed_uids": [-1]}), "allowed_uids"),
        (with_(importers={"echo": {"command": []}}), "non-empty list"),
        (with_(importers={"echo": {"command": ["x"], "user": "root"}}), "non-root"),
        (with_(limits={"peer_timeout": 0}), "limits.peer_timeout"),
        (with_(limits={"app_timeout": "fast"}), "limits.app_timeout"),
        (with_(adapters=["tcp"]), "cannot be disabled"),
        (with_(adapters=["application", "net_addr", "tcp", "shim6"]), "unknown"),
        (with_(faults={"fail": "export:tcp.get_state"}), "faults.fail"),
        (with_(faults={"delay_after_check": -1}), "faults.delay_after_check"),
        (with_(moves={"keep_cpus_awake": True}), "moves.keep_cpus_awake: one of during-moves"),
        (with_(moves=[]), "moves: a table"),
    ],
)
def test_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(data, "/tmp")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(str(tmp_path / "missing.toml"), "/tmp")
    bad = tmp_path / "bad.toml"
    bad.write_text("device = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load(str(bad), "/tmp")
